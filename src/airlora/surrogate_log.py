"""`airlora log-rounds`: the real rounds a round-formulation surrogate is fitted and checked on.

One engine (model, data, link settings of a sweep preset at one r_max) plays three kinds of
real episode, each rebuilt from its own seed (fresh adapter, batch order, link draws), so a
killed run resumes at the first unfinished episode and reproduces the same rows:

- **design** episodes: every round's rank vector (one level per group of projections: type x
  depth band) and SNR is a point of a scrambled Sobol sequence, so that the logged rounds fill
  the space of group levels and channels instead of clustering where one policy goes. A level
  u in [0, 1) is the rank floor((r_max + 1)^u) - 1: small ranks, where accuracy moves most,
  get as many points as large ones. After each round the trained checkpoint is re-scored
  under two other deliveries (evaluation only, no training): the head alone (rank 0) and a
  random truncation of the trained ranks at another SNR. These *counterfactual* rows show
  the response to what arrives with the training held fixed.
- **anchor** episodes: every rank 0, and every rank r_max, at Sobol SNRs.
- with ``replicates`` > 1, every design and anchor episode is played again from other seeds
  (same rank vectors, SNRs and counterfactual draws; another batch order, head and channel
  draws). A surrogate is blind to the seed, so these paired replicates are what shows how
  much of a round's accuracy is the seed's, and what its expected value is.
- **policy** episodes: fixed policies (LoRA at several ranks, the SNR heuristic, the deadline
  oracle, group-shifted vectors) at the preset's evaluation SNRs on paired seeds that no
  design episode used: the returns a surrogate must rank the way real rounds do.

Writes ``rounds.jsonl`` (design, anchor and counterfactual rows), ``policies.jsonl`` (policy
rows) and ``manifest.json`` (config, seeds, versions, code revision) into the output folder;
finished episodes are kept in ``episodes/`` until the run completes. A finished log can be
*extended* to more replicates (``extend``): its episodes are taken over as they are and only
the new replicates are played, which gives the rows a run of the larger plan would have.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.stats import qmc

from airlora.config import SweepConfig
from airlora.engine import RoundEngine
from airlora.env.observation import projection_groups
from airlora.env.surrogate import LoggedRound
from airlora.link import build_link
from airlora.runs import atomic_write_text, code_revision, package_versions, read_jsonl
from airlora.sweep.planning import cell_model

ROUNDS = "rounds.jsonl"
POLICIES = "policies.jsonl"
MANIFEST = "manifest.json"
EPISODES = "episodes"


@dataclass(frozen=True)
class LogPlan:
    """What to log. Seeds: design and anchor episodes use ``seed``, ``seed + 1``, ...
    (:meth:`episode_seed`; with ``replicates`` > 1 each further play of them the next
    ``design_episodes + 2`` seeds); policy episodes use ``policy_seeds`` (disjoint from
    those, and from the seeds a sweep evaluates on, which the caller keeps apart)."""

    r_max: int
    design_episodes: int = 44
    counterfactuals: bool = True
    policy_snrs_db: tuple[float, ...] = (8.0, 14.0, 20.0)
    policy_seeds: tuple[int, ...] = (1000, 1001)
    seed: int = 100
    depth_bands: int = 2
    replicates: int = 1

    def __post_init__(self) -> None:
        if self.r_max <= 0:
            raise ValueError(f"r_max must be positive, got {self.r_max}")
        if self.design_episodes < 2:
            raise ValueError("log at least two design episodes")
        if self.replicates < 1:
            raise ValueError(f"replicates must be at least 1, got {self.replicates}")
        design = self.design_seeds()
        if design & set(self.policy_seeds):
            raise ValueError(
                f"policy seeds must differ from the design and anchor episodes' seeds "
                f"({min(design)}-{max(design)} with {self.replicates} replicate(s))"
            )

    @classmethod
    def from_dict(cls, plan: dict) -> LogPlan:
        """The plan a log's manifest records (``manifest["plan"]``)."""
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in plan.items()})

    def episode_seed(self, episode: int, replicate: int = 0) -> int:
        """The seed of design or anchor episode ``episode`` (anchors follow the design
        episodes) in its ``replicate``-th play; replicate 0 is ``seed + episode``."""
        return self.seed + replicate * (self.design_episodes + 2) + episode

    def design_seeds(self) -> set[int]:
        """The seeds of every play of every design and anchor episode."""
        return {
            self.episode_seed(e, k)
            for k in range(self.replicates)
            for e in range(self.design_episodes + 2)
        }


def _plan_dict(plan: LogPlan) -> dict:
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()}
    if plan.replicates == 1:  # a plan without replicates keeps the identity it always had
        del out["replicates"]
    return out


def sobol_points(n: int, dims: int, seed: int) -> np.ndarray:
    """``n`` points of a scrambled Sobol sequence in [0, 1)^dims (the first ``n`` of the next
    power of two, which keeps most of its balance)."""
    m = max(1, math.ceil(math.log2(max(n, 2))))
    return qmc.Sobol(dims, scramble=True, seed=seed).random_base2(m)[:n]


def level_to_rank(u: np.ndarray, r_max: int) -> np.ndarray:
    return np.clip(np.floor((r_max + 1.0) ** np.asarray(u)) - 1, 0, r_max).astype(np.int64)


def fixed_policies(
    projection_names: Sequence[str], r_max: int, depth_bands: int = 2
) -> dict[str, Callable[[float, RoundEngine], list[int]]]:
    """Named fixed policies: each maps (SNR dB, engine) to a rank vector."""
    m = len(projection_names)
    _, types = projection_groups(projection_names, 1)
    _, groups = projection_groups(projection_names, depth_bands)
    types, groups = np.asarray(types), np.asarray(groups)
    n_types = int(types.max()) + 1
    # The deeper band of each type: its groups' indices are the later ones of that type.
    deep = np.asarray([g % depth_bands == depth_bands - 1 for g in groups])
    low = max(1, r_max // 4)

    def uniform(rank: int) -> Callable[[float, RoundEngine], list[int]]:
        return lambda _snr, _engine: [rank] * m

    def shaped(mask: np.ndarray) -> Callable[[float, RoundEngine], list[int]]:
        vector = np.where(mask, r_max, low).tolist()
        return lambda _snr, _engine: vector

    def heuristic(snr_db: float, _engine: RoundEngine) -> list[int]:
        rate = math.log2(1.0 + 10.0 ** (snr_db / 10.0)) / math.log2(1.0 + 10.0**2.0)
        return [round(r_max * min(1.0, rate))] * m

    def deadline_oracle(snr_db: float, engine: RoundEngine) -> list[int]:
        """The largest uniform rank whose whole payload fits the round's airtime budget."""
        link_config = getattr(engine.link, "config", None)
        budget = None if link_config is None else link_config.deadline_s
        airtime = getattr(engine.link, "airtime_s", None)
        best = 0
        for rank in range(r_max + 1):
            params = engine.server.payload([rank] * m).adapter_params
            if budget is None or airtime is None or airtime(params, snr_db) <= budget:
                best = rank
        return [best] * m

    out: dict[str, Callable[[float, RoundEngine], list[int]]] = {}
    for rank in sorted({0, 1, 2, 4, r_max // 2, r_max}):
        out[f"lora-r{rank}"] = uniform(rank)
    out["heuristic"] = heuristic
    out["deadline-oracle"] = deadline_oracle
    out["early-heavy"] = shaped(~deep)
    out["deep-heavy"] = shaped(deep)
    out["qk-heavy"] = shaped(types < n_types // 2)
    out["vo-heavy"] = shaped(types >= n_types // 2)
    return out


def _round_row(
    kind: str, episode: int, metrics, rounds: int, previous: float, **extra
) -> LoggedRound:
    return LoggedRound(
        episode=episode,
        round=metrics.round - 1,
        rounds=rounds,
        snr_db=float(metrics.snr_db),
        complexity=dict(metrics.complexity),
        rank_vector=[int(r) for r in metrics.rank_vector],
        previous_accuracy=float(previous),
        accuracy=float(metrics.accuracy),
        payload_params=int(metrics.payload_params),
        max_payload_params=int(metrics.max_payload_params),
        kind=kind,
        **extra,
    )


def play_episode(
    engine: RoundEngine,
    config: SweepConfig,
    seed: int,
    vectors: Callable[[int, float], list[int]],
    snrs: Sequence[float],
    kind: str,
    episode: int,
    counterfactual_rng: np.random.Generator | None = None,
    policy: str | None = None,
    depth_bands: int = 2,
    replicate_of: int | None = None,
) -> list[LoggedRound]:
    """One real episode from seed ``seed``: round t trains and sends ``vectors(t, snr_t)``.
    With ``counterfactual_rng``, every trained checkpoint is also re-scored under the head
    alone and under a random truncation at a random SNR (rows of kind ``counterfactual``)."""
    engine.reset(seed)
    engine.link = build_link(config.link, seed)
    previous = engine.initial_accuracy()
    rows: list[LoggedRound] = []
    names = [p.name for p in engine.server.projections]
    groups = np.asarray(projection_groups(names, depth_bands)[1])
    for t, snr in enumerate(snrs):
        ranks = vectors(t, float(snr))
        metrics = engine.run_round(ranks, float(snr))
        if metrics.diverged:
            break  # the real environment ends a diverged episode too
        real = _round_row(
            kind,
            episode,
            metrics,
            len(snrs),
            previous,
            seed=seed,
            policy=policy,
            replicate_of=replicate_of,
        )
        rows.append(real)
        if counterfactual_rng is not None:
            trained = np.asarray(metrics.rank_vector)
            share = counterfactual_rng.random(int(groups.max()) + 1)[groups]
            low, high = config.link.snr_low_db, config.link.snr_high_db
            for sent, at in (
                (np.zeros_like(trained), float(snr)),
                (
                    np.floor(trained * share).astype(np.int64),
                    float(counterfactual_rng.uniform(low, high)),
                ),
            ):
                rows.append(_rescore(engine, real, sent, at))
            engine.server.set_rank_vector(metrics.rank_vector)
        previous = metrics.accuracy
    return rows


def _rescore(engine, real: LoggedRound, sent, snr_db: float) -> LoggedRound:
    """The real round ``real`` had ``sent`` (<= its trained ranks) gone out at ``snr_db``."""
    sent = [int(r) for r in sent]
    # The re-score must not become the receiver's memory (erasure_fill: previous) for the
    # next real round; its random draws do come from the episode's link stream.
    memory = getattr(engine.link, "_previous", None)
    saved = dict(memory) if memory is not None else None
    engine.server.set_rank_vector(sent)
    engine.deliver(sent, snr_db)
    if saved is not None:
        engine.link._previous = saved
    accuracy, _loss = engine.evaluate(engine.edge, engine.task.edge_eval)
    return replace(
        real,
        snr_db=float(snr_db),
        accuracy=float(accuracy),
        payload_params=int(engine.server.payload(sent).total_params),
        kind="counterfactual",
        sent_vector=sent,
    )


def _design_job(episode: int, replicate: int) -> str:
    # Replicate 0 keeps the job names of a log without replicates.
    return f"design-{episode:03d}" + (f"-rep{replicate}" if replicate else "")


def _anchor_job(rank: int, replicate: int) -> str:
    return f"anchor-r{rank}" + (f"-rep{replicate}" if replicate else "")


def _policy_job(name: str, snr_db: float, seed: int) -> str:
    return f"policy-{name}-{snr_db:g}dB-s{seed}"


def _finished_manifest(source: Path) -> dict:
    manifest_file = Path(source) / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{source} is not a finished log (no {MANIFEST})")
    return json.loads(manifest_file.read_text(encoding="utf-8"))


def _differing(theirs: dict, ours: dict) -> list[str]:
    return sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))


@dataclass
class _Source:
    """A finished log being extended: its manifest, replicates and rows grouped by job."""

    manifest: dict
    replicates: int
    jobs: dict[str, list[str]]


def _extendable(source: Path, config: SweepConfig, plan: LogPlan) -> _Source:
    """The finished log ``source``, checked to be of ``config`` and of ``plan`` but for fewer
    (or as many) replicates, with its rows grouped into this run's jobs; everything is read
    and checked here, before the run writes anything."""
    manifest = _finished_manifest(source)
    # Both read by today's code: settings added since the log was made take their defaults.
    theirs = SweepConfig.model_validate(manifest["config"]).model_dump(
        mode="json", exclude={"out_dir"}
    )
    ours = config.model_dump(mode="json", exclude={"out_dir"})
    if theirs != ours:
        raise ValueError(
            f"{source} was logged with another config (differs in: {_differing(theirs, ours)})"
        )
    try:
        their_plan = LogPlan.from_dict(manifest["plan"])
    except TypeError as err:
        raise ValueError(f"{source}'s plan is not one this code knows ({err})") from err
    theirs, ours = (
        _plan_dict(replace(their_plan, replicates=1)),
        _plan_dict(replace(plan, replicates=1)),
    )
    if theirs != ours:
        raise ValueError(
            f"{source} was logged with another plan (differs in: {_differing(theirs, ours)}); "
            "only replicates can be added"
        )
    if their_plan.replicates > plan.replicates:
        raise ValueError(
            f"{source} has {their_plan.replicates} replicates; it can be extended to "
            f"{their_plan.replicates} or more, not {plan.replicates}"
        )
    where = {
        plan.episode_seed(e, k): (e, k)
        for e in range(plan.design_episodes + 2)
        for k in range(their_plan.replicates)
    }
    anchors = (0, plan.r_max)
    jobs: dict[str, list[str]] = {}
    for name in (ROUNDS, POLICIES):
        for line in (Path(source) / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["kind"] == "policy":
                job = _policy_job(row["policy"], row["snr_db"], row["seed"])
            elif row["seed"] not in where:
                raise ValueError(f"{source} holds a row of seed {row['seed']}, not of its plan")
            elif row["kind"] in ("design", "counterfactual"):
                job = _design_job(row["episode"], where[row["seed"]][1])
            else:
                e, k = where[row["seed"]]
                job = _anchor_job(anchors[e - plan.design_episodes], k)
            jobs.setdefault(job, []).append(line + "\n")
    return _Source(manifest, their_plan.replicates, jobs)


def _take_over(source: _Source, job_ids: Sequence[str], episodes_dir: Path) -> None:
    """Write the source log's episodes ``job_ids`` into ``episodes_dir`` as this run's own,
    those not there yet. One it holds no row of (a policy it did not have, an episode that
    ended in its first round) is left to be played: the same seed gives the same rows."""
    for job in job_ids:
        path = episodes_dir / f"{job}.jsonl"
        if job in source.jobs and not path.exists():
            atomic_write_text(path, "".join(source.jobs[job]))
    # The revisions that logged the episodes taken over come first.
    starts = episodes_dir / "revisions.json"
    revisions = json.loads(starts.read_text(encoding="utf-8")) if starts.exists() else []
    manifest = source.manifest
    earlier = manifest.get("episode_code_revisions") or [manifest.get("code_revision")]
    merged = [r for r in earlier if r not in revisions] + revisions
    atomic_write_text(starts, json.dumps(merged))


def extend_log(
    source: Path,
    out_dir: Path,
    replicates: int,
    on_episode: Callable[[str, int, int], None] | None = None,
) -> Path:
    """The finished log ``source`` with ``replicates`` plays of each design and anchor
    episode, into ``out_dir``: its own config and plan, its episodes kept, only the new
    replicates played (:func:`log_rounds` with ``extend``)."""
    manifest = _finished_manifest(source)
    config = SweepConfig.model_validate(manifest["config"])
    plan = replace(LogPlan.from_dict(manifest["plan"]), replicates=replicates)
    return log_rounds(config, plan, out_dir, on_episode, extend=Path(source))


def log_rounds(
    config: SweepConfig,
    plan: LogPlan,
    out_dir: Path,
    on_episode: Callable[[str, int, int], None] | None = None,
    extend: Path | None = None,
) -> Path:
    """Log the plan's episodes into ``out_dir`` (see the module docstring); resumes a run
    that was stopped. ``extend``: a finished log of the same config and plan with fewer
    replicates, whose episodes are taken over instead of played again. Returns
    ``out_dir``."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} already holds a finished log; choose another folder")
    taken = None
    if extend is not None:
        if Path(extend).resolve() == out_dir.resolve():
            raise ValueError("a log is extended into another folder, not into itself")
        taken = _extendable(Path(extend), config, plan)  # before anything is written
    model = cell_model(config, plan.r_max)
    engine = RoundEngine.build(
        config.data,
        model,
        config.train,
        build_link(config.link, plan.seed),
        plan.seed,
        protect_head=config.link.protect_head,
    )
    names = [p.name for p in engine.server.projections]
    group_names, groups = projection_groups(names, plan.depth_bands)
    groups_arr = np.asarray(groups)
    rounds = config.train.rounds
    low, high = config.link.snr_low_db, config.link.snr_high_db
    episodes_dir = out_dir / EPISODES
    episodes_dir.mkdir(parents=True, exist_ok=True)
    # A resumed run must be the same run: its episodes are joined into one file at the end.
    identity = {
        "config": config.model_dump(mode="json", exclude={"out_dir"}),
        "plan": _plan_dict(plan),
    }
    if taken is not None:  # an extension resumes only from the log it started from
        identity["extends"] = {k: taken.manifest.get(k) for k in ("finished", "code_revision")}
    identity = json.dumps(identity, sort_keys=True)
    stamp = episodes_dir / "plan.json"
    if stamp.exists() and stamp.read_text(encoding="utf-8") != identity:
        raise ValueError(
            f"{out_dir} holds episodes of another config or plan; choose another folder"
        )
    atomic_write_text(stamp, identity)
    # The identity pins config and plan, not code: a resume under other code is recorded.
    starts = episodes_dir / "revisions.json"
    revisions = json.loads(starts.read_text(encoding="utf-8")) if starts.exists() else []
    revision = code_revision()
    if revision not in revisions:
        revisions.append(revision)
        atomic_write_text(starts, json.dumps(revisions))

    # (name, replicate it plays (0 for a policy episode), play)
    jobs: list[tuple[str, int, Callable[[], list[LoggedRound]]]] = []
    points = sobol_points(plan.design_episodes * rounds, len(group_names) + 1, plan.seed)
    anchor_snrs = low + (high - low) * sobol_points(2 * rounds, 1, plan.seed + 1)[:, 0]
    design_points = []  # per design episode: each round's group levels and SNR
    for e in range(plan.design_episodes):
        block = points[e * rounds : (e + 1) * rounds]
        design_points.append(
            (level_to_rank(block[:, :-1], plan.r_max), low + (high - low) * block[:, -1])
        )
    for k in range(plan.replicates):
        for e, (levels, snrs) in enumerate(design_points):

            def design(e=e, k=k, levels=levels, snrs=snrs) -> list[LoggedRound]:
                # The counterfactual draws belong to the design point, not to the seed.
                rng = np.random.default_rng([plan.seed, e])
                return play_episode(
                    engine,
                    config,
                    plan.episode_seed(e, k),
                    lambda t, _s: levels[t][groups_arr].tolist(),
                    snrs,
                    "design",
                    e,
                    rng if plan.counterfactuals else None,
                    depth_bands=plan.depth_bands,
                    replicate_of=plan.episode_seed(e) if k else None,
                )

            jobs.append((_design_job(e, k), k, design))
        for a, rank in enumerate((0, plan.r_max)):
            e = plan.design_episodes + a
            snrs = anchor_snrs[a * rounds : (a + 1) * rounds]

            def anchor(e=e, k=k, rank=rank, snrs=snrs) -> list[LoggedRound]:
                return play_episode(
                    engine,
                    config,
                    plan.episode_seed(e, k),
                    lambda _t, _s: [rank] * len(names),
                    snrs,
                    "anchor",
                    e,
                    replicate_of=plan.episode_seed(e) if k else None,
                )

            jobs.append((_anchor_job(rank, k), k, anchor))
    policies = fixed_policies(names, plan.r_max, plan.depth_bands)
    e = plan.design_episodes + 2
    for name, choose in policies.items():
        for snr in plan.policy_snrs_db:
            for seed in plan.policy_seeds:

                def policy(e=e, name=name, choose=choose, snr=snr, seed=seed):
                    return play_episode(
                        engine,
                        config,
                        seed,
                        lambda _t, s: choose(s, engine),
                        [snr] * rounds,
                        "policy",
                        e,
                        policy=name,
                    )

                jobs.append((_policy_job(name, snr, seed), 0, policy))
                e += 1

    if taken is not None:  # the extended log's episodes: every replicate it has
        kept = [job_id for job_id, k, _ in jobs if k < taken.replicates]
        _take_over(taken, kept, episodes_dir)
    for i, (job_id, _, play) in enumerate(jobs):
        path = episodes_dir / f"{job_id}.jsonl"
        if not path.exists():  # a resumed run skips what it finished
            rows = play()
            atomic_write_text(path, "".join(json.dumps(r.__dict__) + "\n" for r in rows))
        if on_episode:
            on_episode(job_id, i + 1, len(jobs))

    logged = [
        LoggedRound(**d)
        for job_id, _, _ in jobs
        for d in read_jsonl(episodes_dir / f"{job_id}.jsonl")
    ]
    design_rows = [r for r in logged if r.kind != "policy"]
    policy_rows = [r for r in logged if r.kind == "policy"]
    atomic_write_text(out_dir / ROUNDS, "".join(json.dumps(r.__dict__) + "\n" for r in design_rows))
    atomic_write_text(
        out_dir / POLICIES, "".join(json.dumps(r.__dict__) + "\n" for r in policy_rows)
    )
    manifest = {
        "kind": "log-rounds",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.model_dump(mode="json", exclude={"out_dir"}),
        "plan": _plan_dict(plan),
        "projection_names": names,
        "params_per_rank": [p.d_in + p.d_out for p in engine.server.projections],
        "head_params": engine.server.payload().head_params,
        "initial_accuracy": engine.initial_accuracy(),
        "edge_eval_rows": len(engine.task.edge_eval),
        # Every seed an episode is played from (one that ended early too): evaluations must
        # use others.
        "episode_seeds": sorted(plan.design_seeds() | set(plan.policy_seeds)),
        "counts": {
            kind: sum(r.kind == kind for r in logged)
            for kind in ("design", "counterfactual", "anchor", "policy")
        },
        "versions": package_versions(),
        "code_revision": revision,
        # Every code revision that logged some of these episodes (one unless resumed).
        "episode_code_revisions": revisions,
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(episodes_dir)
    return out_dir
