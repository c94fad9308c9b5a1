"""What one command runs: a fixed-rank fine-tuning, a policy training, an episode, a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from airlora.config.base import ConfigBase, merge_section
from airlora.config.link import LinkConfig
from airlora.config.policy import AirLLMConfig, EnvConfig, PPOConfig, SurrogateConfig
from airlora.config.task import DataConfig, ModelConfig, TrainConfig


class OnlineSettings(ConfigBase):
    """The online formulation (the authors' reference implementation): one environment step
    is one training step, and the policy learns during the single fine-tuning run.

    Parameters
    ----------
    steps:
        Training steps of the run (environment steps, violated ones included). Default 150.
    episode_steps:
        Steps per episode: PPO updates once per episode; the model is never reset. Default 15.
    snr_levels_db:
        The SNR of every step is drawn uniformly from these levels (Es/N0, dB). Default
        -5, 0, 5, 10, 15.
    bandwidth_hz, slot_s, bits_per_param:
        The Shannon cost C = params x bits / (B log2(1 + SNR) T). Defaults 100 MHz, 1 s, 32.
        On a simulated link (``link.scheme`` digital, coded or analog) the cost is the
        airtime of the first transmission of the step's adapter payload against the slot,
        C = airtime / T: ``link.quant_bits`` per parameter (``bits_per_param`` is the Shannon
        cost's), whole packets with CRC or LDPC codewords, at ``bandwidth_hz`` symbols/s (it
        replaces ``link.bandwidth_hz``); only ``link.modulation: adaptive`` makes the airtime
        depend on the SNR (with a fixed modulation, a code or analog the SNR decides what is
        lost). Nothing is cut at the slot (``link.deadline_s`` is ignored): ARQ
        retransmissions and control data appear in the reported airtime but are not priced,
        nor is the head (as in the reference; it travels protected by default). A step that
        fits trains, then its adapter travels over that link to the edge's copy: erasures
        are counted, and the copy the edge holds at the end (the last adapter that arrived,
        not the server's best validated state) is scored on the test split
        (``edge_test_accuracy``).
    cost_weight:
        lambda: the reward is -loss - lambda C, or -penalty C - lambda C when C > 1.
        Default 0.1.
    violation_penalty:
        The penalty factor of a violated step (which does not train). Default 10.
    min_rank:
        Smallest rank of a projection (ranks are min_rank..r_max). Default 1.
    validate_every:
        Steps between validations of the server model; the best one is kept and scored on
        the test split at the end. Default 100.
    rank_levels:
        The ranks a learned policy (``airllm``, ``ppo``) and ``random`` choose from:
        ``linear`` is every rank ``min_rank..r_max`` (the reference's decoding); ``log2`` is
        ``min_rank``, the powers of two between, and ``r_max`` (1, 2, 4, ..., 64 at r_max 64):
        an untrained policy then starts near the geometric middle of the range instead of
        ``r_max / 2``, and each choice is one of a few levels, which a short run can learn.
        Default linear.
    adalora_budget:
        AdaLoRA's budget: ``r_max`` starts every projection at ``r_max`` and prunes toward
        ``model.adalora.target_rank`` (PEFT's convention); ``link`` matches it to the link:
        the target is the mean over the SNR levels of the largest uniform rank that fits a
        slot, and the start 1.5 times that (PEFT's default ratio, 12 to 8), at most
        ``r_max``. Without it AdaLoRA at r_max 64 never fits a slot and never trains.
        Default r_max.
    constraint:
        What a rank vector whose payload does not fit the slot (C > 1) does: ``penalty`` (the
        reference) trains nothing and pays ``violation_penalty``; ``project`` scales every
        rank down by the same factor (floored, at least ``min_rank``) until it fits, and trains
        at those ranks: a safety layer (Dalal et al., 2018) that leaves a policy the shape of
        its allocation to learn, not the constraint. AdaLoRA chooses its own ranks and is never
        projected. Default penalty.
    """

    steps: int = Field(default=150, ge=1)
    episode_steps: int = Field(default=15, ge=1)
    snr_levels_db: list[float] = [-5.0, 0.0, 5.0, 10.0, 15.0]
    bandwidth_hz: float = Field(default=1e8, gt=0)
    slot_s: float = Field(default=1.0, gt=0)
    bits_per_param: int = Field(default=32, ge=1)
    cost_weight: float = Field(default=0.1, ge=0)
    violation_penalty: float = Field(default=10.0, ge=0)
    min_rank: int = Field(default=1, ge=0)
    validate_every: int = Field(default=100, ge=1)
    rank_levels: Literal["linear", "log2"] = "linear"
    adalora_budget: Literal["r_max", "link"] = "r_max"
    constraint: Literal["penalty", "project"] = "penalty"

    @field_validator("snr_levels_db")
    @classmethod
    def _some_levels(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("snr_levels_db needs at least one level")
        return v


class FinetuneConfig(ConfigBase):
    """One remote fine-tuning episode with fixed ranks (``airlora finetune``).

    Parameters
    ----------
    rank:
        Rank of every adapted projection (``0..model.r_max``). Default: ``model.r_max`` (8).
    rank_vector:
        One rank per adapted projection; overrides ``rank`` when given.
    seed:
        Seeds data splits, batch order, initialisation and the link. Default 0.
    final_test:
        Evaluate the edge's final model on the whole test split. Default true.
    out_dir:
        Where run folders are created. Default ``runs``.
    run_name:
        Folder name of this run; default: ``finetune-<timestamp>-seed<seed>``.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    link: LinkConfig = LinkConfig()
    rank: int | None = Field(default=None, ge=0)
    rank_vector: list[int] | None = None
    seed: int = 0
    final_test: bool = True
    out_dir: Path = Path("runs")
    run_name: str | None = None

    @field_validator("rank_vector")
    @classmethod
    def _non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(r < 0 for r in v):
            raise ValueError(f"rank_vector entries must be >= 0, got {v}")
        return v

    def rank_vector_for(self, num_projections: int) -> list[int]:
        """The rank vector this config asks for, given the model's projection count."""
        if self.rank_vector is not None:
            return list(self.rank_vector)
        rank = self.model.r_max if self.rank is None else self.rank
        return [rank] * num_projections

    @model_validator(mode="after")
    def _within_r_max(self) -> FinetuneConfig:
        r_max = self.model.r_max
        if self.rank is not None and self.rank > r_max:
            raise ValueError(f"rank {self.rank} exceeds model.r_max {r_max}")
        if self.rank_vector is not None and any(r > r_max for r in self.rank_vector):
            raise ValueError(f"rank_vector {self.rank_vector} has entries above r_max {r_max}")
        return self


class PolicyTrainConfig(ConfigBase):
    """`airlora train-policy`: a policy trained on the real (or surrogate) environment.

    The episode is ``train.rounds`` rounds of ``train.steps_per_round`` steps; the SNR of each
    round comes from ``link``'s SNR process. The default link is where rank and channel meet:
    uncoded digital with adaptive modulation (target BER 1e-4), 1,024-bit packets with CRC and
    a 0.25 s airtime deadline per round at 1 MHz, SNR uniform over -5..25 dB. The deadline lets
    about 31k parameters through on BPSK at 10 dB and all of rank 8 on 64-QAM at 25 dB; below
    about 7 dB no packet survives. What does not fit is not delivered (the tail of the stream).
    """

    method: Literal["airllm", "ppo", "random", "heuristic"] = "airllm"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(rounds=5, steps_per_round=8, warmup_steps=4)
    link: LinkConfig = LinkConfig(
        scheme="digital",
        modulation="adaptive",
        target_ber=1e-4,
        packet_bits=1024,
        deadline_s=0.25,
        snr_process="uniform",
        snr_low_db=-5.0,
        snr_high_db=25.0,
    )
    env: EnvConfig = EnvConfig()
    ppo: PPOConfig = PPOConfig()
    airllm: AirLLMConfig = AirLLMConfig()
    surrogate: SurrogateConfig | None = None
    total_steps: int = Field(default=20_000, ge=1)
    seed: int = 0
    tensorboard: bool = False
    out_dir: Path = Path("runs")
    run_name: str | None = None


METHODS = ("airllm", "ppo", "lora", "adalora", "random", "heuristic", "oracle")


ONLINE_LINKS = ("shannon", "digital", "coded", "analog")


def online_link_error(scheme: str) -> str:
    return (
        "the online formulation prices each step's payload against a slot on the shannon "
        f"(capacity), digital, coded or analog link (link.scheme); got '{scheme}'"
    )


ORACLE_ONLINE_ONLY = (
    "method oracle (the slot-filling rank vector) is defined in the online formulation only "
    "(formulation: online)"
)


class RunConfig(ConfigBase):
    """`airlora run`: one real episode of one method (design section 4).

    Every method goes through the same round engine, link model and edge evaluation.
    ``lora`` sends ``rank`` (default r_max) on every projection; ``adalora`` runs PEFT's AdaLoRA
    with ``model.adalora``'s budget; ``random`` and ``heuristic`` need nothing more; ``airllm``
    and ``ppo`` play the saved policy in ``policy`` (a folder written by ``train-policy``).
    Defaults of the episode and the link are those of :class:`PolicyTrainConfig`.

    ``formulation: online`` runs the authors' formulation instead (:class:`OnlineSettings`):
    one step is one training step, ``airllm`` and ``ppo`` learn during the run (``ppo`` and
    ``airllm`` settings; no saved policy), and the link prices each step (``shannon``: the
    reference's capacity cost; ``digital``, ``coded``, ``analog``: simulated, see
    :class:`OnlineSettings`).
    """

    method: Literal["airllm", "ppo", "lora", "adalora", "random", "heuristic", "oracle"] = "lora"
    formulation: Literal["round", "online"] = "round"
    online: OnlineSettings = OnlineSettings()
    ppo: PPOConfig = PPOConfig()
    airllm: AirLLMConfig = AirLLMConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(rounds=5, steps_per_round=8, warmup_steps=4)
    link: LinkConfig = PolicyTrainConfig.model_fields["link"].default
    env: EnvConfig = EnvConfig()
    rank: int | None = Field(default=None, ge=0)
    policy: Path | None = None
    seed: int = 0
    final_test: bool = False
    out_dir: Path = Path("runs")
    run_name: str | None = None

    @model_validator(mode="after")
    def _method_inputs(self) -> RunConfig:
        if self.formulation == "online":
            if self.link.scheme not in ONLINE_LINKS:
                raise ValueError(online_link_error(self.link.scheme))
        elif self.method == "oracle":
            raise ValueError(ORACLE_ONLINE_ONLY)
        elif self.method in ("airllm", "ppo") and self.policy is None:
            raise ValueError(
                f"method {self.method} plays a saved policy: give policy (a train-policy run's "
                "policy/ folder), or learn online with formulation: online"
            )
        if self.rank is not None and self.rank > self.model.r_max:
            raise ValueError(f"rank {self.rank} exceeds model.r_max {self.model.r_max}")
        if (self.method == "adalora") != (self.model.adapter == "adalora"):
            adapter = "adalora" if self.method == "adalora" else "lora"
            self.model = self.model.model_copy(update={"adapter": adapter})
        return self


class MethodSpec(ConfigBase):
    """One entry of a sweep: a method, optionally with settings that make it an ablation.

    Parameters
    ----------
    name: label in tables and figures (``airllm``, ``airllm-no-denoiser``, ``lora-r4``...).
    method: one of airllm, ppo, lora, adalora, random, heuristic, oracle (online only).
    rank: lora's fixed rank; default r_max.
    airllm, env, ppo, model, train: overrides merged into the sweep's sections for this entry
        (for example ``airllm: {use_denoiser: false}``, ``env: {use_complexity: false}``,
        ``model: {adalora: {orth_reg_weight: 0.0}}``, ``train: {learning_rate: 0.01}``).
    """

    name: str
    method: Literal["airllm", "ppo", "lora", "adalora", "random", "heuristic", "oracle"]
    rank: int | None = Field(default=None, ge=0)
    airllm: dict = {}
    env: dict = {}
    ppo: dict = {}
    model: dict = {}
    train: dict = {}

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"method name '{v}' must be letters, digits, '-', '_' or '.'")
        return v


class TuningConfig(ConfigBase):
    """The learning-rate grid every method of a sweep gets (the same budget for all).

    Before the evaluation runs, each (method, r_max) runs once per learning rate and tuning
    seed; the rate with the best mean validation accuracy (ties go to the earlier rate of the
    grid) is the one its evaluation runs use. The test split is not scored in a tuning run,
    and tuning seeds must differ from the evaluation seeds.

    - online sweeps: a tuning run is a whole online run, scored by its best state;
    - round sweeps: a tuning run is one real episode at the sweep's median SNR (a trained
      policy plays the policy of the first evaluation seed, trained on the surrogate), scored
      by the edge's final model on the whole validation split.

    Parameters
    ----------
    learning_rates: the grid of ``train.learning_rate`` values (at least one); the head's
        rate keeps its ratio to it (``train.head_learning_rate / train.learning_rate``).
    seeds: seeds of the tuning runs. Default [1000].
    """

    learning_rates: list[float]
    seeds: list[int] = [1000]

    @field_validator("learning_rates")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(lr <= 0 for lr in v):
            raise ValueError(f"tuning.learning_rates must be positive values, got {v}")
        if len({f"{lr:g}" for lr in v}) != len(v):  # the cell ids print rates with %g
            raise ValueError(f"tuning.learning_rates must differ in 6 significant digits: {v}")
        return v


class SweepConfig(ConfigBase):
    """`airlora sweep`: methods x r_max x SNR x seeds, every cell a real episode.

    Policies (airllm, ppo and their ablations) are trained once per (entry, r_max, seed) on a
    surrogate fitted to real rounds logged once per (r_max, seed), then evaluated at every
    SNR. ``train.rounds`` etc. describe the episode of every cell.

    Parameters
    ----------
    name: the sweep's folder name under ``out_dir``.
    methods: the entries (:class:`MethodSpec`).
    r_max: values of r_max.
    snr_db: fixed SNRs (Es/N0, dB) of the evaluation episodes.
    seeds: seeds; each seeds its policy training and its evaluation episodes.
    formulation: ``round`` (the above) or ``online``: one cell per (entry, r_max, seed), a
        whole online run (:class:`OnlineSettings`; policies learn inside it; ``snr_db`` is
        not used: every step draws its SNR from ``online.snr_levels_db``).
    tuning: a learning-rate grid run for every method before the evaluation runs
        (:class:`TuningConfig`); none by default (every method at ``train.learning_rate``).
    workers: parallel worker processes. Default 1.
    threads_per_worker: torch threads in each worker; 0 shares the cores evenly.
    """

    name: str = "sweep"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(rounds=5, steps_per_round=8, warmup_steps=4)
    link: LinkConfig = PolicyTrainConfig.model_fields["link"].default
    env: EnvConfig = EnvConfig()
    ppo: PPOConfig = PPOConfig()
    airllm: AirLLMConfig = AirLLMConfig()
    surrogate: SurrogateConfig = SurrogateConfig()
    total_steps: int = Field(default=20_000, ge=1)
    formulation: Literal["round", "online"] = "round"
    online: OnlineSettings = OnlineSettings()
    methods: list[MethodSpec]
    r_max: list[int] = [8]
    snr_db: list[float] = [0.0, 10.0, 20.0]
    seeds: list[int] = [0]
    tuning: TuningConfig | None = None
    workers: int = Field(default=1, ge=1)
    threads_per_worker: int = Field(default=0, ge=0)
    out_dir: Path = Path("runs")

    @model_validator(mode="after")
    def _entries(self) -> SweepConfig:
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("a sweep needs at least one method")
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        if any(r <= 0 for r in self.r_max):
            raise ValueError(f"r_max values must be positive, got {self.r_max}")
        for m in self.methods:
            if m.rank is not None and m.rank > min(self.r_max):
                raise ValueError(f"{m.name}: rank {m.rank} exceeds r_max {min(self.r_max)}")
            # An entry's overrides are merged when its cells run, maybe hours in: check them now.
            for section in ("airllm", "ppo", "env", "train"):
                overrides = getattr(m, section)
                if overrides:
                    try:
                        merge_section(getattr(self, section), overrides)
                    except ValueError as err:  # pydantic's ValidationError is a ValueError
                        raise ValueError(f"method {m.name}: its {section} section: {err}") from err
        if self.formulation == "round" and self.surrogate.rounds_file is not None:
            from airlora.env.surrogate import resolve_rounds_file

            for r_max in self.r_max:  # a missing log would stop the sweep hours in
                try:
                    path = resolve_rounds_file(self.surrogate.rounds_file, r_max)
                except FileNotFoundError as err:
                    raise ValueError(f"surrogate.rounds_file for r_max {r_max}: {err}") from err
                if not path.is_file():
                    raise ValueError(f"surrogate.rounds_file for r_max {r_max}: no file {path}")
                logged = _logged_seeds(path.parent / "manifest.json")
                if logged & set(self.seeds):
                    raise ValueError(
                        f"seeds {sorted(logged & set(self.seeds))} were used to log {path}: "
                        "evaluate on other seeds"
                    )
                tuning = set(self.tuning.seeds) if self.tuning else set()
                if logged & tuning:
                    raise ValueError(
                        f"tuning seeds {sorted(logged & tuning)} were used to log {path}: "
                        "tune on other seeds"
                    )
        if self.formulation != "online" and any(m.method == "oracle" for m in self.methods):
            raise ValueError(ORACLE_ONLINE_ONLY)
        if self.formulation == "online" and self.link.scheme not in ONLINE_LINKS:
            raise ValueError(online_link_error(self.link.scheme))
        if self.tuning is not None:
            shared = sorted(set(self.tuning.seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"tuning seeds {shared} are also evaluation seeds")
        return self


def _logged_seeds(manifest: Path) -> set[int]:
    """The seeds an ``airlora log-rounds`` folder used (none known without its manifest)."""
    import json

    if not manifest.is_file():
        return set()
    body = json.loads(manifest.read_text(encoding="utf-8"))
    if "episode_seeds" in body:
        return {int(x) for x in body["episode_seeds"]}
    # Logs written before the manifest listed its seeds had no replicates: the plan's design
    # and anchor seeds follow one another.
    plan = body.get("plan", {})
    first, n = int(plan.get("seed", 0)), int(plan.get("design_episodes", 0))
    return set(range(first, first + n + 2)) | {int(x) for x in plan.get("policy_seeds", [])}


def surrogate_section(
    current: dict | None,
    enabled: bool | None,
    real_episodes: int | None = None,
    rounds_file: Path | str | None = None,
) -> dict | None:
    """The ``surrogate`` section of a :class:`PolicyTrainConfig` after the switches of
    ``train-policy``: ``enabled`` False trains on real rounds (None); True, or a number of
    episodes, or a rounds file, turns the surrogate on with those settings; nothing given
    keeps ``current``."""
    if enabled is False:
        return None
    if enabled is None and real_episodes is None and rounds_file is None:
        return current
    section = dict(current or {})
    if real_episodes is not None:
        section["real_episodes"] = real_episodes
    if rounds_file is not None:
        section["rounds_file"] = str(rounds_file)
    return section


class EdgeSpec(ConfigBase):
    """One edge device of a deployment (`airlora deploy`).

    Parameters
    ----------
    name: how the run folder and its SuperNode name it (letters, digits, ``_.-``). Default
        ``edge<i>`` by position.
    snr_db: its channel's SNR (Es/N0, dB) with ``link.snr_process: fixed`` (the deployment's
        default), or the mean of ``gauss_markov``; ``uniform`` and ``trace`` ignore it.
    seed: seeds its SNR process and its emulated channel's draws. Default: its position.
    """

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    snr_db: float
    seed: int | None = None


class DeployConfig(ConfigBase):
    """`airlora deploy`: the cloud trainer and N edges as real processes on Flower.

    The cloud (a Flower ServerApp) trains one adapter at r_max and, each round, picks a rank
    vector per edge with ``method`` from that edge's last reported SNR, sends each edge its
    own truncation (quantised as ``link`` says), and records what every edge reports: its
    accuracy on its own evaluation rows, the bytes it received and its next SNR. Each edge (a
    ClientApp on a SuperNode) emulates its channel at the receiver with ``link``.

    Parameters
    ----------
    method: the rank rule per edge: ``heuristic`` (default), ``lora`` (``rank``, default
        r_max), ``random``, or a trained ``airllm`` / ``ppo`` policy (``policy``).
    edges: the edges (:class:`EdgeSpec`); default three at 5, 15 and 25 dB.
    round_timeout_s: how long a round waits for the edges' replies; a late edge misses the
        round. Default 300 s.
    register_timeout_s: how long the cloud waits, before its first round, for every edge to
        say who it is (their models load meanwhile); default 600 s.
    edge_eval_rows: validation rows each edge scores (edge i the i-th block of them); default
        ``data.edge_eval_size``.
    downlink: ``unicast`` (default: each edge its truncation at the modulation its own SNR
        picks) or ``multicast`` (rank-layered: each layer of ranks at the modulation the
        weakest edge that receives it picks, :mod:`airlora.deploy.multicast`; every edge
        still decodes at its own SNR). Both are priced in ``multicast.jsonl`` either way.
        Multicast with a ``link.deadline_s`` is not modelled.
    data, model, train, link, env, rank, policy, seed, out_dir, run_name: as for
        :class:`RunConfig` (``train.rounds`` rounds of ``train.steps_per_round`` steps).
    """

    method: Literal["heuristic", "lora", "random", "airllm", "ppo"] = "heuristic"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig(rounds=5, steps_per_round=8, warmup_steps=4)
    # The policies' link, each edge at its own fixed SNR.
    link: LinkConfig = PolicyTrainConfig.model_fields["link"].default.model_copy(
        update={"snr_process": "fixed"}
    )
    env: EnvConfig = EnvConfig()
    edges: list[EdgeSpec] = Field(
        default=[EdgeSpec(snr_db=5.0), EdgeSpec(snr_db=15.0), EdgeSpec(snr_db=25.0)],
        validate_default=True,
    )
    round_timeout_s: float = Field(default=300.0, gt=0)
    register_timeout_s: float = Field(default=600.0, gt=0)
    edge_eval_rows: int | None = Field(default=None, ge=1)
    downlink: Literal["unicast", "multicast"] = "unicast"
    rank: int | None = Field(default=None, ge=0)
    policy: Path | None = None
    seed: int = 0
    out_dir: Path = Path("runs")
    run_name: str | None = None

    @field_validator("edges")
    @classmethod
    def _name_edges(cls, edges: list[EdgeSpec]) -> list[EdgeSpec]:
        if not edges:
            raise ValueError("a deployment needs at least one edge")
        named = [
            edge.model_copy(
                update={
                    "name": edge.name or f"edge{i}",
                    "seed": i if edge.seed is None else edge.seed,
                }
            )
            for i, edge in enumerate(edges)
        ]
        names = [e.name for e in named]
        if len(set(names)) != len(names):
            raise ValueError(f"edge names must be unique, got {names}")
        return named

    @model_validator(mode="after")
    def _inputs(self) -> DeployConfig:
        if self.method in ("airllm", "ppo") and self.policy is None:
            raise ValueError(f"method {self.method} plays a saved policy: give policy")
        if self.rank is not None and self.rank > self.model.r_max:
            raise ValueError(f"rank {self.rank} exceeds model.r_max {self.model.r_max}")
        if self.link.scheme in ("shannon", "coded"):
            raise ValueError(
                f"link scheme {self.link.scheme} is not emulated at the edge: use perfect, "
                "analog or digital"
            )
        if self.model.adapter == "adalora":
            raise ValueError("a deployment truncates one adapter per edge: adapter lora or svd")
        if self.downlink == "multicast" and self.link.deadline_s is not None:
            raise ValueError(
                "downlink multicast with link.deadline_s is not modelled (which layers fit "
                "before each edge's deadline): drop one of them"
            )
        return self
