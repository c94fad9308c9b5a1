"""`airlora bench surrogate`: the round surrogate against the earlier ridge, on shipped rounds.

Both models are fitted and scored leave-one-episode-out on the logged real rounds shipped with
the package (:mod:`airlora.surrogate_log`; ``airlora/datasets/surrogate/<name>/``): project =
held-out R^2 of :class:`~airlora.env.response.ResponseModel`, peer = that of
:class:`~airlora.env.response.RidgeModel` on the same folds. ``details.spearman`` is the rank
correlation between the returns the surrogate (fitted on all logged rounds) predicts for the
fixed policies of the log and their real returns, over (policy, SNR) pairs, each the mean of
its paired seeds. The surrogate plays each policy closed-loop: from the unadapted model's
accuracy, every round's prediction is the next round's previous accuracy, as in training.

A round's accuracy depends on the seed (batch order, the head's initial draw, the channel's
draws), which no surrogate sees. The shipped ``paper-cpu-r8`` log plays every design point
from two seeds (``airlora log-rounds --replicates 2``); an episode is held out with its
replicate, and the details also give each model's R^2 on the mean over the two seeds (the
expected accuracy a seed-blind model is for) and on each seed's rounds alone.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
from scipy.stats import spearmanr

from airlora.config import EnvConfig, LinkConfig
from airlora.env.response import (
    ResponseModel,
    RidgeModel,
    RoundInputs,
    inputs_from_rows,
    leave_one_episode_out,
)
from airlora.env.reward import round_reward
from airlora.env.surrogate import LoggedRound, link_delivery, read_rounds, shipped_log

DEFAULT_LOG = "paper-cpu-r8"


def _models(manifest: dict, link: LinkConfig):
    names, per_rank = manifest["projection_names"], manifest["params_per_rank"]
    r_max = int(manifest["plan"]["r_max"])
    delivery = link_delivery(link)
    return (
        lambda: ResponseModel(names, r_max, per_rank, delivery),
        lambda: RidgeModel(names, r_max, per_rank, delivery),
    )


def closed_loop_returns(
    model, rows: list[LoggedRound], r_max: int, initial_accuracy: float, env: EnvConfig
) -> dict[int, tuple[float, float, float, float]]:
    """Per policy episode: (real return, predicted return, real and predicted sum of
    accuracies), the predicted ones played closed-loop."""
    episodes: dict[int, list[LoggedRound]] = {}
    for r in rows:
        episodes.setdefault(r.episode, []).append(r)
    out = {}
    for e, ep in episodes.items():
        ep = sorted(ep, key=lambda r: r.round)
        x = inputs_from_rows(ep, r_max)
        prev_real = prev_pred = initial_accuracy
        real_ret = pred_ret = real_acc = pred_acc = 0.0
        for t, r in enumerate(ep):
            one = RoundInputs(
                **{
                    f: getattr(x, f)[t : t + 1]
                    for f in RoundInputs.__dataclass_fields__
                    if f != "previous_accuracy"
                },
                previous_accuracy=np.asarray([prev_pred]),
            )
            a = float(model.predict(one)[0])
            real_ret += round_reward(
                r.accuracy, prev_real, r.payload_params, r.max_payload_params, env
            )
            pred_ret += round_reward(a, prev_pred, r.payload_params, r.max_payload_params, env)
            real_acc += r.accuracy
            pred_acc += a
            prev_real, prev_pred = r.accuracy, a
        out[e] = (real_ret, pred_ret, real_acc, pred_acc)
    return out


def _policy_rank_correlation(per_episode: dict, policy_rows: list[LoggedRound]) -> dict:
    """Spearman correlation of real and predicted returns over (policy, SNR) pairs (each the
    mean over its seeds), pooled and within each SNR; and of the summed accuracies."""
    first: dict[int, LoggedRound] = {}
    for r in policy_rows:
        first.setdefault(r.episode, r)
    pairs: dict[tuple[str, float], list] = {}
    for e, values in per_episode.items():
        pairs.setdefault((first[e].policy, first[e].snr_db), []).append(values)
    keys = sorted(pairs)
    means = np.asarray([np.mean(pairs[k], axis=0) for k in keys])
    within = {}
    for s in sorted({k[1] for k in keys}):
        idx = [i for i, k in enumerate(keys) if k[1] == s]
        within[f"{s:g}"] = float(spearmanr(means[idx, 0], means[idx, 1]).statistic)
    return {
        "spearman": float(spearmanr(means[:, 0], means[:, 1]).statistic),
        "within_snr": within,
        "accuracy_only": float(spearmanr(means[:, 2], means[:, 3]).statistic),
        "policies": len({k[0] for k in keys}),
        "pairs": len(keys),
        "seeds_per_pair": min(len(v) for v in pairs.values()),
        "returns": {
            f"{k[0]}@{k[1]:g}dB": {
                "real": round(float(m[0]), 4),
                "surrogate": round(float(m[1]), 4),
            }
            for k, m in zip(keys, means, strict=True)
        },
    }


def replicate_variance(policy_rows: list[LoggedRound]) -> tuple[float, int]:
    """How much a round's accuracy varies when only the seed changes: half the mean squared
    difference between paired-seed policy rounds (same policy, SNR and round), and the number
    of pairs. Against the variance of the held-out rounds it shows how much of it no model
    blind to the seed (batch order, head draw, channel draws) could explain; the previous
    accuracy reveals part of the seed, so a model that reads it can do somewhat better."""
    by_cell: dict[tuple, dict[int | None, float]] = {}
    for r in policy_rows:
        by_cell.setdefault((r.policy, r.snr_db, r.round), {})[r.seed] = r.accuracy
    diffs = [a - b for v in by_cell.values() if len(v) == 2 for a, b in [tuple(v.values())]]
    if not diffs:
        return math.nan, 0
    return float(np.mean(np.square(diffs)) / 2), len(diffs)


def bench_surrogate(name: str = DEFAULT_LOG) -> dict:
    """Held-out R^2 of the surrogate (project) and of the earlier ridge (peer); see the module
    docstring."""
    started = time.perf_counter()
    folder = shipped_log(name)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    # The link and reward settings alone: the rest of the logged config may predate today's.
    link = LinkConfig.model_validate(manifest["config"]["link"])
    env = EnvConfig.model_validate(manifest["config"]["env"])
    rows = read_rounds(folder / "rounds.jsonl")
    policy_rows = read_rounds(folder / "policies.jsonl")
    r_max = int(manifest["plan"]["r_max"])
    eval_rows = int(manifest["edge_eval_rows"])
    make_response, make_ridge = _models(manifest, link)
    project = leave_one_episode_out(make_response, rows, r_max, eval_rows)
    peer = leave_one_episode_out(make_ridge, rows, r_max, eval_rows)

    x_all, y_all = inputs_from_rows(rows, r_max), [r.accuracy for r in rows]
    a0 = float(manifest["initial_accuracy"])
    spearman = {}
    for side, make in (("project", make_response), ("peer", make_ridge)):
        fitted = make().fit(x_all, y_all)
        spearman[side] = _policy_rank_correlation(
            closed_loop_returns(fitted, policy_rows, r_max, a0, env), policy_rows
        )
    ours = spearman["project"]
    seed_var, seed_pairs = replicate_variance(policy_rows)
    held_out = np.var([r.accuracy for r in rows if r.kind in ("design", "anchor")])
    return {
        "name": "surrogate",
        "unit": "held-out R^2",
        "project": project["loeo_r2"],
        "peer": peer["loeo_r2"],
        "ratio": project["loeo_r2"] / peer["loeo_r2"] if peer["loeo_r2"] > 0 else None,
        "details": {
            "log": name,
            "project_replicate_mean_r2": project.get("replicate_mean_r2"),
            "peer_replicate_mean_r2": peer.get("replicate_mean_r2"),
            "spearman": ours["spearman"],
            "spearman_within_snr": ours["within_snr"],
            "spearman_accuracy_only": ours["accuracy_only"],
            "peer_spearman": spearman["peer"]["spearman"],
            "peer_spearman_within_snr": spearman["peer"]["within_snr"],
            "policies": ours["policies"],
            "policy_snr_pairs": ours["pairs"],
            "seeds_per_pair": ours["seeds_per_pair"],
            # The share of the held-out rounds' variance that a change of seed alone shows.
            "seed_variance_share": seed_var / float(held_out) if seed_pairs else None,
            "seed_pairs": seed_pairs,
            "project_fit": project,
            "peer_fit": peer,
            "returns": ours["returns"],
            "project_description": "semi-analytic: link delivery computed, bounded ridge response",
            "peer_description": "the earlier ridge on eight global features",
            "wall_s": round(time.perf_counter() - started, 2),
        },
    }
