"""The round surrogate: the link's part computed, a monotone response, leave-one-episode-out
scores, the logging experiment (resume), and the shipped logged rounds."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest

from airlora.config import LinkConfig, SweepConfig
from airlora.env.response import (
    ResponseModel,
    binomial_noise,
    inputs_from_rows,
    leave_one_episode_out,
)
from airlora.env.surrogate import LoggedRound, link_delivery, read_rounds
from airlora.link import WirelessLink

NAMES = [f"enc.layer.{i}.attn.{t}" for i in range(4) for t in ("q", "v")]
COMPLEXITY = {"length": 0.5, "type_token_ratio": 0.7, "rarity": 0.4, "tokens_per_word": 1.2}


def _rows(law, episodes=12, rounds=4, r_max=4, seed=0, kind="design"):
    """Logged rounds whose accuracy follows ``law(sent, snr, t)`` plus a little noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for ep in range(episodes):
        prev = 0.3
        for t in range(rounds):
            ranks = rng.integers(0, r_max + 1, size=len(NAMES))
            snr = float(rng.uniform(-5, 20))
            acc = float(np.clip(law(ranks, snr, t) + rng.normal(0, 0.005), 0, 1))
            rows.append(
                LoggedRound(
                    ep,
                    t,
                    rounds,
                    snr,
                    {**COMPLEXITY, "model_loss": None},
                    ranks.tolist(),
                    prev,
                    acc,
                    10,
                    20,
                    kind=kind,
                )
            )
            prev = acc
    return rows


def test_response_model_recovers_a_known_law_through_the_link():
    # A deadline link: at low SNR the tail of the stream (the deep projections) is cut.
    link = LinkConfig(scheme="digital", modulation="bpsk", packet_bits=256, deadline_s=0.002)
    per_rank = [64] * len(NAMES)
    delivery = link_delivery(link)
    assert delivery is not None

    def law(ranks, snr, t):
        got = ranks * delivery(ranks * per_rank, snr)
        return 0.3 + 0.05 * t + 0.1 * np.log1p(got[:4].mean()) + 0.05 * np.log1p(got[4:].mean())

    rows = _rows(law)
    fit = leave_one_episode_out(lambda: ResponseModel(NAMES, 4, per_rank, delivery), rows, 4)
    assert fit["loeo_r2"] > 0.9
    # Without the link's part (everything "arrives"), the same model cannot see the cut.
    blind = leave_one_episode_out(lambda: ResponseModel(NAMES, 4, per_rank, None), rows, 4)
    assert blind["loeo_r2"] < fit["loeo_r2"] - 0.1


def test_response_model_is_monotone_in_delivered_ranks_even_against_its_data():
    # Data in which sending more of one group *lowers* the accuracy (noise a few hundred
    # rounds can show): the bounded coefficients refuse to learn that.
    rows = _rows(lambda r, s, t: 0.6 - 0.05 * r[0] + 0.02 * r[1:].mean(), episodes=20)
    model = ResponseModel(NAMES, 4).fit(inputs_from_rows(rows, 4), [r.accuracy for r in rows])
    assert model.coef_ is not None and np.all(model.coef_[: model.n_delivered_features] >= 0)

    class Unbounded(ResponseModel):
        n_delivered_features = 0  # the same regression without the bounds

    free = Unbounded(NAMES, 4).fit(inputs_from_rows(rows, 4), [r.accuracy for r in rows])
    base = inputs_from_rows(rows[:1], 4)

    def along_first_projection(m: ResponseModel) -> list[float]:
        out = []
        for rank in range(5):
            sent = base.sent.copy()
            sent[0, 0] = rank
            out.append(float(m.predict(type(base)(**{**base.__dict__, "sent": sent}))[0]))
        return out

    bounded = along_first_projection(model)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(bounded))
    # Unbounded, the same features follow the data down: the bound is what keeps it monotone.
    follows = along_first_projection(free)
    assert follows[-1] < follows[0] - 0.01


def test_inputs_from_rows_carries_each_episodes_history():
    rows = _rows(lambda r, s, t: 0.5, episodes=2, rounds=3)
    again = LoggedRound(**{**rows[1].__dict__, "kind": "counterfactual", "sent_vector": [0] * 8})
    x = inputs_from_rows([*rows, again], 4)
    means = [np.mean(r.rank_vector) / 4 for r in rows[:3]]
    assert x.trained_share[2] == pytest.approx(np.mean(means))
    assert np.array_equal(x.previous_sent[1], rows[0].rank_vector)
    assert not x.previous_sent[0].any() and x.round_index.tolist()[:3] == [0, 1, 2]
    # A re-scored checkpoint shares its round's history and sends what it says it sent.
    assert x.trained_share[-1] == pytest.approx(x.trained_share[1])
    assert np.array_equal(x.previous_sent[-1], x.previous_sent[1]) and not x.sent[-1].any()


def test_leave_one_episode_out_scores_real_rounds_only_and_states_the_noise_floor():
    rows = _rows(lambda r, s, t: 0.4 + 0.05 * t, episodes=5)
    rescored = [
        LoggedRound(**{**r.__dict__, "kind": "counterfactual", "sent_vector": [0] * 8})
        for r in rows
    ]
    fit = leave_one_episode_out(lambda: ResponseModel(NAMES, 4), rows + rescored, 4, 128)
    assert fit["episodes"] == 5 and fit["held_out_rounds"] == len(rows)
    y = np.asarray([r.accuracy for r in rows])
    assert fit["noise_floor_rmse"] == pytest.approx(np.sqrt(binomial_noise(y, 128)))
    assert binomial_noise(np.asarray([0.5]), 100) == pytest.approx(0.0025)
    with pytest.raises(ValueError, match="three"):
        leave_one_episode_out(lambda: ResponseModel(NAMES, 4), rows[:8], 4)
    # Rounds that all scored alike: no floor to state, and nothing non-finite in JSON.
    flat = [LoggedRound(**{**r.__dict__, "accuracy": 0.5}) for r in rows]
    same = leave_one_episode_out(lambda: ResponseModel(NAMES, 4), flat, 4, 128)
    assert same["noise_floor_r2"] is None
    json.dumps(same, allow_nan=False)
    # Two logs joined: the same episode numbers under other seeds are other folds.
    joined = [LoggedRound(**{**r.__dict__, "seed": 1}) for r in rows] + [
        LoggedRound(**{**r.__dict__, "seed": 2}) for r in _rows(lambda r, s, t: 0.4, episodes=5)
    ]
    assert leave_one_episode_out(lambda: ResponseModel(NAMES, 4), joined, 4)["episodes"] == 10


def test_an_episode_is_held_out_with_its_replicates_and_scored_on_their_mean():
    law = lambda r, s, t: 0.4 + 0.05 * t + 0.02 * r.mean()  # noqa: E731
    originals = _rows(law, episodes=5)
    # A replicate: the same ranks and SNRs from another seed, with seed noise of its own.
    noise = np.random.default_rng(7).normal(0, 0.05, len(originals))
    replicas = [
        replace(r, seed=50 + r.episode, replicate_of=r.episode, accuracy=r.accuracy + n)
        for r, n in zip(originals, noise, strict=True)
    ]
    originals = [replace(r, seed=r.episode) for r in originals]
    seen: list[set[int]] = []

    class Recording(ResponseModel):
        def fit_features(self, f, y):
            seen.append({int(v) for v in f[:, -1]})
            return super().fit_features(f[:, :-1], y)

        def predict_features(self, f):
            return super().predict_features(f[:, :-1])

        def features(self, x):
            return np.column_stack([super().features(x), episode])

    rows = originals + replicas
    episode = np.asarray([r.episode for r in rows], np.float64)
    fit = leave_one_episode_out(lambda: Recording(NAMES, 4), rows, 4)
    # Five folds, each trained on the other four design points, both seeds of each.
    assert fit["episodes"] == 5 and fit["held_out_rounds"] == len(rows)
    assert sorted(len(s) for s in seen) == [4] * 5 and len({frozenset(s) for s in seen}) == 5
    assert fit["replicate_mean_rounds"] == len(originals) and fit["replicates_per_round"] == 2
    assert fit["replicate_seed_variance"] == pytest.approx(np.mean(np.square(noise)) / 2)
    # Averaging two seeds halves their noise: the mean is the easier, and the right, target.
    assert fit["replicate_mean_r2"] > fit["loeo_r2"]
    assert fit["loeo_r2_originals"] > 0.5 and fit["loeo_r2_replicates"] > 0.5
    # Without replicates there is no mean to score.
    assert "replicate_mean_r2" not in leave_one_episode_out(
        lambda: ResponseModel(NAMES, 4), originals, 4
    )


def test_a_log_plan_gives_replicates_seeds_of_their_own():
    from airlora.surrogate_log import LogPlan

    plan = LogPlan(r_max=4, design_episodes=3, replicates=2, seed=10, policy_seeds=(100,))
    seeds = [plan.episode_seed(e, k) for k in range(2) for e in range(5)]
    assert seeds[:5] == [10, 11, 12, 13, 14] and len(set(seeds)) == 10
    with pytest.raises(ValueError, match="policy seeds"):
        LogPlan(r_max=4, design_episodes=3, replicates=2, seed=10, policy_seeds=(19,))
    assert LogPlan(r_max=4, design_episodes=3, seed=10, policy_seeds=(19,)).replicates == 1
    with pytest.raises(ValueError, match="replicates"):
        LogPlan(r_max=4, replicates=0)


def test_replicate_variance_is_half_the_mean_squared_paired_difference():
    from airlora.bench.surrogate import replicate_variance

    rows = []
    for seed, acc in ((1000, [0.5, 0.6]), (1001, [0.7, 0.5]), (1002, [0.1, 0.1])):
        for t, a in enumerate(acc):
            row = LoggedRound(0, t, 2, 10.0, COMPLEXITY, [1] * 8, 0.3, a, 10, 20, kind="policy")
            rows.append(replace(row, seed=seed, policy="lora-r1", episode=seed))
    # Seeds 1000 and 1001 pair up per round; a seed alone makes no pair.
    var, pairs = replicate_variance(rows[:4])
    assert pairs == 2 and var == pytest.approx(((0.2**2) + (0.1**2)) / 2 / 2)
    assert replicate_variance(rows[4:]) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_expected_delivery_is_cached_per_snr_and_unchanged():
    link = WirelessLink(LinkConfig(scheme="digital", modulation="adaptive", deadline_s=0.01))
    sizes = [5000, 5000, 5000]
    first = link.expected_delivery(sizes, 12.0)
    assert np.array_equal(first, link.expected_delivery(sizes, 12.0))
    fresh = WirelessLink(LinkConfig(scheme="digital", modulation="adaptive", deadline_s=0.01))
    assert np.array_equal(first, fresh.expected_delivery(sizes, 12.0))
    assert link.expected_delivery(sizes, -5.0).sum() <= first.sum()


@pytest.mark.parametrize("log", ["paper-cpu-r8", "paper-cpu-r64"])
def test_shipped_rounds_validate_the_surrogate(log):
    from airlora.bench.surrogate import bench_surrogate, shipped_log

    manifest = json.loads((shipped_log(log) / "manifest.json").read_text())
    assert manifest["counts"]["design"] >= 150 and manifest["counts"]["policy"] >= 30 * 2
    assert not manifest["code_revision"]["dirty"]
    result = bench_surrogate(log)
    assert set(result) == {"name", "unit", "project", "peer", "ratio", "details"}
    details = result["details"]
    # What the issue asks of the held-out fit and of the rank order (train-policy's own
    # default threshold is lower, 0.3).
    assert result["project"] >= 0.5
    assert details["spearman"] >= 0.8 and details["policies"] >= 10
    assert details["project_fit"]["held_out_rounds"] >= 40
    assert details["seed_pairs"] >= 100 and 0 < details["seed_variance_share"] < 1
    if manifest["plan"].get("replicates", 1) > 1:  # scored on its seeds' mean and each seed too
        fit = details["project_fit"]
        assert details["project_replicate_mean_r2"] == fit["replicate_mean_r2"]
        assert fit["replicate_mean_rounds"] * 2 == fit["held_out_rounds"]
        # The mean over seeds carries half the seed's noise: it is the easier target.
        assert fit["replicate_mean_r2"] > result["project"]
        assert 0 < fit["replicate_seed_variance_share"] < 1
    with pytest.raises(FileNotFoundError, match="known"):
        shipped_log("nope")


def test_surrogate_env_replays_whole_real_episodes_of_a_designed_log():
    from gymnasium.utils.env_checker import check_env

    from airlora.config import EnvConfig
    from airlora.env.surrogate import SurrogateEnv, read_rounds, resolve_rounds_file

    path = resolve_rounds_file("shipped:paper-cpu-r{r_max}", 8)
    rows = read_rounds(path)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    link = LinkConfig.model_validate(manifest["config"]["link"])
    model = ResponseModel(
        manifest["projection_names"], 8, manifest["params_per_rank"], link_delivery(link)
    )
    model.fit(inputs_from_rows(rows, 8), [r.accuracy for r in rows])
    env = SurrogateEnv(
        model, rows, link, EnvConfig(), manifest["params_per_rank"], manifest["head_params"]
    )
    real = [r for r in rows if r.kind != "counterfactual"]
    # Every seed's play of an episode is a sequence of its own (46 design points, two seeds).
    assert len(env._episodes) == len({(r.kind, r.episode, r.seed) for r in real}) == 92
    for episode in env._episodes:
        assert [r.round for r in episode] == [0, 1, 2, 3]
        assert len({r.kind for r in episode}) == 1 and len({r.episode for r in episode}) == 1
    check_env(env, skip_render_check=True)
    env.reset(seed=3)
    rewards = [env.step(np.full(24, 4))[1] for _ in range(4)]
    assert all(np.isfinite(rewards))


def test_configs_saved_before_the_check_still_load():
    from airlora.config import SurrogateConfig

    with pytest.warns(DeprecationWarning, match="holdout_fraction"):
        old = SurrogateConfig.model_validate({"real_episodes": 4, "holdout_fraction": 0.25})
    assert old.real_episodes == 4 and old.min_r2 == 0.3


def test_log_rounds_resumes_and_matches_an_uninterrupted_run(
    tiny_finetune_config, tmp_path, monkeypatch
):
    import airlora.surrogate_log
    from airlora.runs import code_revision
    from airlora.surrogate_log import LogPlan, extend_log, log_rounds

    cfg = tiny_finetune_config
    config = SweepConfig.model_validate(
        {
            "data": cfg.data.model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json"),
            "train": {"rounds": 2, "steps_per_round": 1, "warmup_steps": 0},
            "link": {"scheme": "digital", "modulation": "adaptive", "deadline_s": 0.01},
            "methods": [{"name": "lora", "method": "lora"}],
        }
    )
    plan = LogPlan(
        r_max=4, design_episodes=2, policy_snrs_db=(10.0,), policy_seeds=(1000,), replicates=2
    )
    whole = log_rounds(config, plan, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_after_three(job, done, total):
        if done == 3:
            raise Stop

    old_code = {"commit": "0" * 40, "dirty": False}  # the cut run's code was other code
    with monkeypatch.context() as patch, pytest.raises(Stop):
        patch.setattr(airlora.surrogate_log, "code_revision", lambda: old_code)
        log_rounds(config, plan, tmp_path / "cut", on_episode=stop_after_three)
    assert len(list((tmp_path / "cut" / "episodes").glob("*.jsonl"))) == 3
    assert not (tmp_path / "cut" / "rounds.jsonl").exists()
    resumed = log_rounds(config, plan, tmp_path / "cut")
    for name in ("rounds.jsonl", "policies.jsonl"):
        assert (whole / name).read_text() == (resumed / name).read_text()
    # The resume is recorded: both revisions that logged episodes are named.
    revisions = json.loads((resumed / "manifest.json").read_text())["episode_code_revisions"]
    assert revisions == [old_code, code_revision()]
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["episode_code_revisions"] == [manifest["code_revision"]]
    # Two replicates of 2 design and 2 anchor episodes; 10 fixed policies at r_max 4 (LoRA
    # at 0, 1, 2, 4 and six others) x 2 rounds.
    assert manifest["counts"] == {"design": 8, "counterfactual": 16, "anchor": 8, "policy": 20}
    assert manifest["episode_seeds"] == [100, 101, 102, 103, 104, 105, 106, 107, 1000]
    rows = read_rounds(whole / "rounds.jsonl")
    originals = [r for r in rows if r.replicate_of is None]
    replicas = [r for r in rows if r.replicate_of is not None]
    assert len(replicas) == len(originals) == 16
    for o, r in zip(originals, replicas, strict=True):
        # The same design point, counterfactual draws included, from another seed.
        assert (r.kind, r.episode, r.round) == (o.kind, o.episode, o.round)
        assert r.replicate_of == o.seed and r.seed == o.seed + 4
        assert (r.rank_vector, r.snr_db, r.sent_vector) == (o.rank_vector, o.snr_db, o.sent_vector)
    assert {"versions", "code_revision", "config", "plan"} <= set(manifest)
    with pytest.raises(FileExistsError):
        log_rounds(config, plan, tmp_path / "whole")
    other = LogPlan(r_max=4, design_episodes=3, policy_snrs_db=(10.0,), policy_seeds=(1000,))
    log_rounds_stamp = tmp_path / "cut2"
    with pytest.raises(Stop):
        log_rounds(config, plan, log_rounds_stamp, on_episode=stop_after_three)
    with pytest.raises(ValueError, match="another config or plan"):
        log_rounds(config, other, log_rounds_stamp)

    # A one-seed log extended to two seeds keeps its episodes, plays only the second seed's,
    # and gives the two-seed run's rows.
    from dataclasses import replace

    one = log_rounds(config, replace(plan, replicates=1), tmp_path / "one")
    played = []
    play = airlora.surrogate_log.play_episode
    monkeypatch.setattr(
        airlora.surrogate_log,
        "play_episode",
        lambda *a, **k: played.append(a[2]) or play(*a, **k),
    )

    def stop_first(job, done, total):
        if done == 1:
            raise Stop

    with pytest.raises(Stop):  # an extension stopped at its first episode ...
        log_rounds(config, plan, tmp_path / "extended", on_episode=stop_first, extend=one)
    with pytest.raises(ValueError, match="another config or plan"):  # ... resumes from its log
        log_rounds(config, plan, tmp_path / "extended", extend=whole)
    extended = extend_log(one, tmp_path / "extended", replicates=2)  # its own config and plan
    assert sorted(played) == [104, 105, 106, 107]  # the second seed's designs and anchors
    for name in ("rounds.jsonl", "policies.jsonl"):
        assert (whole / name).read_text() == (extended / name).read_text()
    assert json.loads((extended / "manifest.json").read_text())["plan"]["replicates"] == 2
    refused = {
        "another plan .*design_episodes": (config, replace(other, replicates=2), one),
        "has 2 replicates; it can be extended to 2 or more, not 1": (
            config,
            replace(plan, replicates=1),
            extended,
        ),
        "another config .*train": (
            config.model_copy(update={"train": config.train.model_copy(update={"rounds": 3})}),
            plan,
            one,
        ),
        "not into itself": (config, plan, tmp_path / "bad"),
    }
    for message, (bad_config, bad_plan, source) in refused.items():
        with pytest.raises(ValueError, match=message):
            log_rounds(bad_config, bad_plan, tmp_path / "bad", extend=source)
        assert not (tmp_path / "bad").exists()  # refused before anything was written
    # The command takes config and plan from the log it extends, and nothing else.
    from typer.testing import CliRunner

    from airlora.cli import app

    args = ["log-rounds", "--extend", str(one), "--out", str(tmp_path / "bad"), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--rmax", "8"])
    assert result.exit_code == 2 and "--extend takes the config and plan" in result.output
    result = CliRunner().invoke(app, ["log-rounds", "--extend", "shipped:nope", "--quiet"])
    assert result.exit_code == 2 and "no shipped logged rounds named 'nope'" in result.output
    result = CliRunner().invoke(app, [*args[:2], str(tmp_path / "missing"), *args[3:]])
    assert result.exit_code == 2 and "is not a finished log" in result.output
    assert not (tmp_path / "bad").exists()


def test_a_sweep_trains_on_a_given_log_instead_of_logging(tiny_finetune_config, tmp_path):
    from typer.testing import CliRunner

    from airlora.cli import app
    from airlora.config import EnvConfig
    from airlora.env.real import RankSelectionEnv
    from airlora.env.surrogate import collect_rounds, resolve_rounds_file, write_rounds

    cfg = tiny_finetune_config
    train = {"rounds": 2, "steps_per_round": 1, "warmup_steps": 0}
    link = {"scheme": "analog", "snr_process": "fixed", "snr_db": 10.0}
    env = RankSelectionEnv.build(
        cfg.data,
        cfg.model,
        type(cfg.train)(**train),
        LinkConfig(**link),
        EnvConfig(),
    )
    write_rounds(collect_rounds(env, 3, seed=50), tmp_path / "log-r4.jsonl")
    body = {
        "name": "given",
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": train,
        "link": link,
        "ppo": {"n_steps": 8, "n_envs": 1, "batch_size": 8, "n_epochs": 1},
        "airllm": {"warm_start_updates": 5, "updates_per_phase": 5},
        "surrogate": {"rounds_file": str(tmp_path / "log-r{r_max}.jsonl"), "min_r2": None},
        "total_steps": 16,
        "methods": [{"name": "airllm", "method": "airllm"}],
        "r_max": [4],
        "snr_db": [10.0],
        "seeds": [0],
        "out_dir": str(tmp_path / "runs"),
    }
    assert resolve_rounds_file(body["surrogate"]["rounds_file"], 4) == tmp_path / "log-r4.jsonl"
    path = tmp_path / "sweep.yaml"
    import yaml

    path.write_text(yaml.safe_dump(body))
    result = CliRunner().invoke(app, ["sweep", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    cells = sorted(p.name for p in (tmp_path / "runs" / "given" / "cells").iterdir())
    assert not any(c.startswith("rounds-") for c in cells) and len(cells) == 2
    policy = tmp_path / "runs" / "given" / "cells" / "policy-airllm-r4-s0"
    assert not (policy / "rounds.jsonl").exists()  # nothing logged: the given log was used
    assert (policy / "surrogate" / "rounds.jsonl").read_text() == (
        tmp_path / "log-r4.jsonl"
    ).read_text()
    # A log missing for one r_max stops the sweep at load, before any cell runs.
    body["r_max"] = [4, 2]
    path.write_text(yaml.safe_dump(body))
    result = CliRunner().invoke(app, ["sweep", str(path), "--quiet"])
    assert result.exit_code == 2 and "r_max 2" in result.output and "log-r2.jsonl" in result.output


def test_a_sweep_refuses_to_evaluate_on_the_seeds_its_given_log_used():
    base = {
        "methods": [{"name": "a", "method": "airllm"}],
        "surrogate": {"rounds_file": "shipped:paper-cpu-r{r_max}"},
        "r_max": [8],
    }
    assert SweepConfig.model_validate({**base, "seeds": [0, 1, 2]}).seeds == [0, 1, 2]
    # A design episode's seed, an anchor's, a second play's (the r_max 8 log has two seeds per
    # design point), the last one, a policy seed.
    for used in (100, 145, 146, 191, 1001):
        with pytest.raises(ValueError, match=rf"seeds \[{used}\] were used to log"):
            SweepConfig.model_validate({**base, "seeds": [0, used]})
    assert SweepConfig.model_validate({**base, "seeds": [0, 192]}).seeds == [0, 192]
    # Tuning seeds too: the default tuning seed (1000) is one of the log's policy seeds.
    with pytest.raises(ValueError, match=r"tuning seeds \[1000\] were used to log"):
        SweepConfig.model_validate({**base, "seeds": [0], "tuning": {"learning_rates": [1e-3]}})
    tuned = {"learning_rates": [1e-3], "seeds": [2000]}
    assert SweepConfig.model_validate({**base, "seeds": [0], "tuning": tuned}).tuning.seeds == [
        2000
    ]
