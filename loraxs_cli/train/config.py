"""`train`'s settings: TrainConfig (with its typed LoRA-SB section), the per-task defaults, and the
config.yaml document that `loraxs train --config RUN/config.yaml` reads back."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace

from .. import data as datamod
from ..datasources import DataSpec, parse_columns
from ..errors import UsageError
from ..lr_finder import LRFindSettings
from ..method_defaults import SB_DEFAULTS, XS_DEFAULTS
from ..methods import get_method
from ..quantize import require_backend
from ..tasks import resolve_task

SCHEDULES = ("linear", "cosine", "constant")
RESUME_MODES = ("auto", "always", "never", "fresh")
DISTRIBUTED = ("ddp", "fsdp")  # under torchrun: a replicated base, or one sharded across the processes
AUTO_LR = "auto"
# Defaults per (task, method) for the settings left unset (None), from the sweep in
# benchmarks/sweep_defaults.py (README "Defaults"): runs of a few hundred steps, not the papers' 10-50 epochs.
DEFAULTS: dict[tuple[str, str], dict[str, float]] = {
    # MiniLM on BBC topics (5 classes; 40 or 80 per class, rank 8 or 16) and politics-vs-business at 1:2:
    # the head's lr is what matters (1e-3 stays near the majority class); with the head at 2e-2, R at
    # 5e-3 was within a point of each task's best. Warmup changed nothing.
    ("seq-cls", "xs"): {"lr": 5e-3, "head_lr": 2e-2, "warmup_ratio": 0.0},
    # LoRA-SB starts at R0 = diag(S) with scaling 1: on the binary task 1e-2 beat 1e-3.
    ("seq-cls", "sb"): {"lr": 1e-2, "head_lr": 2e-2, "warmup_ratio": 0.0},
    ("regression", "xs"): {"lr": 5e-3, "head_lr": 2e-2, "warmup_ratio": 0.0},  # not swept: as seq-cls
    ("regression", "sb"): {"lr": 1e-2, "head_lr": 2e-2, "warmup_ratio": 0.0},
    # SmolLM2-135M on BBC text and on word problems: 3e-3 best on both; 1e-2 worse, 3e-2 breaks the model.
    ("causal-lm", "xs"): {"lr": 3e-3, "warmup_ratio": 0.0},
    ("causal-lm", "sb"): {"lr": 3e-3, "warmup_ratio": 0.0},
    # DPO (preference.py) on SmolLM2-135M, arithmetic answers right vs wrong: README "Preference tuning".
    ("preference", "xs"): {"lr": 3e-3, "warmup_ratio": 0.0},
    ("preference", "sb"): {"lr": 3e-3, "warmup_ratio": 0.0},
}
# Settings that define a run: resuming with different values would silently mix two runs.
IDENTITY = (
    "model",
    "data",
    "task",
    "method",
    "rank",
    "alpha",
    "targets",
    "seed",
    "batch_size",
    "grad_accum",
    "lr",
    "head_lr",
    "max_length",
    "chat_loss",
    "weight_decay",
    "packing",
    "group_by_length",
    "data_config",
    "data_split",
    "data_revision",
    "columns",
    "streaming",
    "shuffle_buffer",
    "beta",
)
# Identity settings added after runs were first checkpointed, with the value an older checkpoint had.
IDENTITY_ADDED = {
    "packing": False, "group_by_length": False,
    "data_config": None, "data_split": None, "data_revision": None, "columns": None, "streaming": False,
    "shuffle_buffer": 1000, "beta": 0.1,
}  # fmt: skip


@dataclass(frozen=True)
class SBConfig:
    """LoRA-SB's initialisation settings for a training run (initialize.SBInit, sb.py); unused by xs."""

    samples: int = SB_DEFAULTS.samples  # rows of the gradient sample
    eta: float = SB_DEFAULTS.eta  # --sb-lr: eta of the approximated first AdamW step
    batch_size: int = SB_DEFAULTS.batch_size  # of the gradient pass
    max_grad_memory: str = SB_DEFAULTS.max_grad_memory
    official_eta: bool = False  # eta from --lr, --warmup-ratio, --epochs: the official code's rule
    step: str = SB_DEFAULTS.step
    grad_mode: str = SB_DEFAULTS.grad_mode
    accum_dtype: str = SB_DEFAULTS.accum_dtype

    @classmethod
    def from_mapping(cls, values: Mapping) -> SBConfig:
        """From a dict (the CLI's, an older caller's `sb={"samples": 8}`); None means the default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(
                f"unknown LoRA-SB setting(s) {', '.join(unknown)}: use {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in values.items() if v is not None})


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    task: str | None = None  # None: inferred from the data (tasks.py); the resolved task is recorded
    method: str = "xs"
    rank: int = 16
    alpha: float | None = None  # default r (scaling 1); LoRA-SB always uses scaling 1
    targets: str | None = None
    eval_data: str | None = None
    eval_split: float = 0.0
    # Where --data comes from when it is a dataset (datasources.py): its configuration, split (default
    # train) and hub revision; --columns FIELD=COLUMN renames columns to loraxs's fields.
    data_config: str | None = None
    data_split: str | None = None
    data_revision: str | None = None
    columns: str | None = None
    streaming: bool = False  # rows read and tokenised as the steps need them (needs max_steps)
    shuffle_buffer: int = 1000  # --streaming: rows shuffled within a buffer this large (0: in order)
    max_length: int = 512
    chat_loss: str = "all"  # messages rows: loss on every assistant turn, or only the last
    beta: float = 0.1  # preference: DPO's beta (preference.DEFAULT_BETA, TRL's default)
    packing: bool = False  # causal-lm: several examples per row of max_length tokens (packing.py)
    group_by_length: bool = False  # batches of examples of similar length (schedule.step_indices)
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float | str | None = None  # None: the task's default (DEFAULTS); "auto": the LR range test
    head_lr: float | None = None  # the paper's "classifier LR"; None: the task's default
    weight_decay: float = 0.0
    warmup_ratio: float | None = None  # None: the task's default
    lr_find_steps: int = 50  # --lr auto: steps of the range test
    schedule: str = "linear"
    epochs: float = 1.0
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    init_std: float = XS_DEFAULTS.init_std
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int | None = None
    metric: str | None = None  # default per task
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # autocast: auto (bf16 on GPU, none on CPU), fp32, bf16, fp16
    dtype: str = "auto"  # base weights
    # int8 | nf4: the backbone's linear layers quantized (quantize.py) once the factors are ready; the
    # factors stay the full-precision base's (the same cache entry), the adapter records it (training).
    quantize: str | None = None
    device: str | None = None
    gradient_checkpointing: bool = False
    # Under torchrun: ddp (every process holds the whole base) or fsdp (the base is sharded, fsdp.py).
    # Not part of the identity: the checkpoints are the same, so a run may continue in the other mode.
    distributed: str = "ddp"
    svd: str = "torch"
    niter: int | None = None  # None: the --svd backend's default (factors.BACKEND_DEFAULTS)
    oversample: int | None = None
    embed_factors: bool = False
    # auto: continue a run found in --out; always: require one; never: refuse one; fresh: replace it
    resume: str = "auto"
    # Experiment trackers (trackers.py): "none", or a comma-separated subset of tensorboard, mlflow, wandb,
    # trackio. Not part of the identity: a resumed run may report to others.
    report_to: str = "none"
    sb: SBConfig = field(default_factory=SBConfig)  # LoRA-SB init settings; a dict is converted

    def __post_init__(self) -> None:
        if isinstance(self.sb, Mapping):
            self.sb = SBConfig.from_mapping(self.sb)

    def data_spec(self) -> DataSpec:
        """--data and the options that say how to read it (datasources.DataSpec)."""
        return DataSpec(
            self.data,
            config=self.data_config,
            split=self.data_split,
            revision=self.data_revision,
            columns=self.columns,
            streaming=self.streaming,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )

    def check_data(self) -> None:
        """The data options among themselves (usage errors, before anything is read)."""
        parse_columns(self.columns)
        if self.shuffle_buffer < 0:
            raise UsageError(f"--shuffle-buffer must be >= 0, got {self.shuffle_buffer}")
        if not self.streaming:
            return
        if not self.max_steps:
            raise UsageError("--streaming needs --max-steps: a stream has no length to count epochs in")
        refused = [
            ("--eval-split", self.eval_split, "a stream cannot hold out a share of itself; give held-out "
             "data with --eval-data (it is read into memory)"),
            ("--packing", self.packing, "packing needs the whole set in memory"),
            ("--group-by-length", self.group_by_length, "grouping by length needs the whole set in memory"),
            ("--sb-official-eta", self.sb.official_eta and self.method == "sb",
             "its eta counts the training rows, which a stream does not know"),
        ]  # fmt: skip
        for flag, given, reason in refused:
            if given:
                raise UsageError(f"--streaming cannot be combined with {flag}: {reason}")

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def validate(self) -> None:
        if self.task is not None:
            datamod.check_task(self.task)
        datamod.check_chat_loss(self.chat_loss)
        self.check_data()
        from .trackers import parse_report_to  # (trackers.py imports this module)

        parse_report_to(self.report_to)  # an unknown tracker, or its library missing: before any work
        if self.quantize is not None:  # an unknown kind, or bitsandbytes missing: before any work
            require_backend(self.quantize)
        if self.quantize and self.distributed == "fsdp":
            raise UsageError(
                "--quantize cannot be combined with --distributed fsdp (FSDP2 does not shard "
                "bitsandbytes' quantized weights); use --distributed ddp"
            )
        get_method(self.method, error=UsageError)
        if self.packing and self.group_by_length:
            raise UsageError(
                "--group-by-length orders unpacked examples and --packing leaves no padding to save: "
                "pass one of them"
            )
        if self.packing and self.task not in (None, "causal-lm"):
            raise UsageError(f"--packing is for causal-lm only, not {self.task}; train without --packing")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown --schedule {self.schedule!r}: use {', '.join(SCHEDULES)}")
        if self.distributed not in DISTRIBUTED:
            raise UsageError(f"unknown --distributed {self.distributed!r}: use {' or '.join(DISTRIBUTED)}")
        if self.resume not in RESUME_MODES:
            raise UsageError(f"resume must be one of {', '.join(RESUME_MODES)}, not {self.resume!r}")
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"--max-steps must be positive, got {self.max_steps}")
        if self.epochs <= 0:
            raise UsageError("--epochs must be positive")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise UsageError(f"--beta must be a positive number, got {self.beta}")
        if isinstance(self.lr, str) or self.lr is None:
            bad_lr = self.lr not in (None, AUTO_LR)
        else:
            bad_lr = not (self.lr > 0 and math.isfinite(self.lr))
        if bad_lr:
            raise UsageError(f"--lr must be a positive number or 'auto', not {self.lr!r}")
        if self.head_lr is not None and not (self.head_lr >= 0 and math.isfinite(self.head_lr)):
            raise UsageError(f"--head-lr must be >= 0 (0: a frozen head), got {self.head_lr}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr == AUTO_LR:
            LRFindSettings(steps=self.lr_find_steps).validate()
        if self.lr == AUTO_LR and self.sb.official_eta:
            raise UsageError("--lr auto cannot set LoRA-SB's official eta (the factors come before the test)")


def with_task(config: TrainConfig, rows: list) -> tuple[TrainConfig, str | None]:
    """The config with its task resolved (--task checked against the rows, or inferred from them), and
    the line that says so when it was inferred."""
    task, reason = resolve_task(config.task, rows, config.data)
    if config.packing and task != "causal-lm":
        raise UsageError(f"--packing is for causal-lm only, not {task}; train without --packing")
    note = f"task: {task} (inferred from {reason}; pass --task to choose another)" if reason else None
    return replace(config, task=task), note


def with_defaults(config: TrainConfig) -> TrainConfig:
    """The config with R's lr, the head's lr and the warmup filled in from DEFAULTS where unset (the task
    must be resolved). `--lr auto` stays "auto" (the range test replaces it); the head's lr has no
    meaning for causal-lm and stays None there."""
    if config.task is None:
        raise ValueError("with_defaults needs the task resolved first")
    chosen = DEFAULTS[(config.task, config.method)]
    filled = {k: v for k, v in chosen.items() if getattr(config, k) is None}
    return replace(config, **filled) if filled else config


# ----------------------------------------------------------------------------------------------
# config.yaml: the settings under the names of `loraxs train`'s long options, so that
# `loraxs train --config RUN/config.yaml` repeats the run; what the run found goes under `recorded:`,
# which --config skips. `resume` says how to treat --out, not what the run is: it is not written.
# The SB section is written flat, as its options: `sb_samples`, `sb_lr` (eta), `max_grad_memory`, ...

RECORDED = "recorded"
NOT_WRITTEN = ("resume",)
SB_OPTIONS = {"eta": "sb_lr", "max_grad_memory": "max_grad_memory"}  # the others: sb_<key>
CONFIG_HEADER = (
    "# loraxs train settings: `loraxs train --config THIS_FILE` repeats the run (flags on the command\n"
    "# line win). `recorded` is what the run found; --config skips it.\n"
)


def _sb_option(key: str) -> str:
    return SB_OPTIONS.get(key, f"sb_{key}")


def settings_document(config: TrainConfig) -> dict:
    """The run's settings keyed by option name (`out`, `lr`, `sb_samples`, ...)."""
    document = {k: v for k, v in asdict(config).items() if k not in NOT_WRITTEN and k != "sb"}
    document.update({_sb_option(k): v for k, v in asdict(config.sb).items()})
    return document


def config_from_document(document: Mapping) -> TrainConfig:
    """The TrainConfig of a settings document (`settings_document`, a RUN/config.yaml of this or an
    older version: names as options, `-` or `_`; `recorded` and unknown names are skipped, missing ones
    take their defaults). Raises KeyError when model, data or out is missing."""
    by_option = {_sb_option(f.name): f.name for f in fields(SBConfig)}
    plain = {f.name for f in fields(TrainConfig)} - {"sb"}
    settings, sb = {}, {}
    for key, value in document.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in by_option:
            sb[by_option[name]] = value
        elif name in plain:
            settings[name] = value
    return TrainConfig(**settings, sb=SBConfig.from_mapping(sb))
