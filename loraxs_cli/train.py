"""`train`: fine-tune the R matrices (and a task head) of a LoRA-XS / LoRA-SB adapter.

One loop serves one process and torchrun: with WORLD_SIZE > 1 the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU). Every process sees the same global order of
examples; each optimizer step takes `batch_size * world * grad_accum` of them, rank k the k-th
slice of each micro-batch. Losses are normalised by the global number of loss terms, so N
processes give the same update as one process with the same global batch.

The run directory:

    RUN_DIR/config.yaml          the resolved settings
    RUN_DIR/metrics.jsonl        step, loss, lr, tokens/s; eval rows
    RUN_DIR/checkpoints/step-N/  state.json + state.safetensors (no pickles, see checkpoint.py): R, head,
                                 optimizer, scheduler, RNG, data position
    RUN_DIR/adapter/             the final adapter;  RUN_DIR/best/  the best by --metric
    RUN_DIR/loss.png             the loss curve
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import data as datamod
from .checkpoint import LegacyCheckpointError, is_checkpoint, load_state, rng_state, save_state, set_rng_state
from .devices import parse_device
from .errors import BadInputError, DivergedError, UsageError
from .evaluate import default_metric, evaluate_examples, improves, loss_sum, model_inputs
from .factors import SVDSettings
from .sb import DEFAULT_ETA
from .tasks import check_architecture, resolve_task

if TYPE_CHECKING:
    from .initialize import SBInit

CHECKPOINTS = "checkpoints"
SCHEDULES = ("linear", "cosine", "constant")
RESUME_MODES = ("auto", "always", "never", "fresh")
AUTO_LR = "auto"
# Defaults per (task, method) for the settings left unset (None), from the sweep in
# benchmarks/sweep_defaults.py (README "Defaults"): runs of a few hundred steps, not the papers' 10-50 epochs.
DEFAULTS: dict[tuple[str, str], dict[str, float]] = {
    # MiniLM, BBC 5 topics and politics-vs-business 1:2: the head's lr is what matters (1e-3 stays at the
    # majority class); R at 3e-3 with the head at 2e-2 was best on both. No warmup: it changed nothing.
    ("seq-cls", "xs"): {"lr": 3e-3, "head_lr": 2e-2, "warmup_ratio": 0.0},
    # LoRA-SB starts at R0 = diag(S), scaling 1: on the binary task 1e-2 beat 1e-3.
    ("seq-cls", "sb"): {"lr": 1e-2, "head_lr": 2e-2, "warmup_ratio": 0.0},
    ("regression", "xs"): {"lr": 3e-3, "head_lr": 2e-2, "warmup_ratio": 0.0},  # not swept: as seq-cls
    ("regression", "sb"): {"lr": 1e-2, "head_lr": 2e-2, "warmup_ratio": 0.0},
    # SmolLM2-135M, BBC text and word problems: 3e-3 best on both; 1e-2 worse, 3e-2 breaks the model.
    ("causal-lm", "xs"): {"lr": 3e-3, "warmup_ratio": 0.0},
    ("causal-lm", "sb"): {"lr": 3e-3, "warmup_ratio": 0.0},
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
)


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
    max_length: int = 512
    chat_loss: str = "all"  # messages rows: loss on every assistant turn, or only the last
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
    init_std: float = 1e-5
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batch_size: int | None = None
    metric: str | None = None  # default per task
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # autocast: auto (bf16 on GPU, none on CPU), fp32, bf16, fp16
    dtype: str = "auto"  # base weights
    device: str | None = None
    gradient_checkpointing: bool = False
    svd: str = "torch"
    niter: int | None = None  # None: the --svd backend's default (factors.BACKEND_DEFAULTS)
    oversample: int | None = None
    embed_factors: bool = False
    # auto: continue a run found in --out; always: require one; never: refuse one; fresh: replace it
    resume: str = "auto"
    sb: dict = field(default_factory=dict)  # LoRA-SB init settings (see sb.py)

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def validate(self) -> None:
        if self.task is not None:
            datamod.check_task(self.task)
        datamod.check_chat_loss(self.chat_loss)
        if self.method not in ("xs", "sb"):
            raise UsageError(f"unknown --method {self.method!r}: use xs or sb")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown --schedule {self.schedule!r}: use {', '.join(SCHEDULES)}")
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
            from .lr_finder import LRFindSettings

            LRFindSettings(steps=self.lr_find_steps).validate()
        if self.lr == AUTO_LR and self.sb.get("official_eta"):
            raise UsageError("--lr auto cannot set LoRA-SB's official eta (the factors come before the test)")


def with_defaults(config: TrainConfig) -> TrainConfig:
    """The config with R's lr, the head's lr and the warmup filled in from DEFAULTS where unset (the task
    must be resolved). `--lr auto` stays "auto" (the range test replaces it); the head's lr has no
    meaning for causal-lm and stays None there."""
    if config.task is None:
        raise ValueError("with_defaults needs the task resolved first")
    chosen = DEFAULTS[(config.task, config.method)]
    filled = {k: v for k, v in chosen.items() if getattr(config, k) is None}
    return replace(config, **filled) if filled else config


@dataclass
class TrainEvents:
    """Callbacks for progress; the CLI renders them, tests may record them."""

    message: Callable[[str], None] = lambda text: None
    start: Callable[[int, int], None] = lambda start_step, total_steps: None
    step: Callable[[dict], None] = lambda row: None
    evaluated: Callable[[dict], None] = lambda row: None


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    best_dir: Path | None
    steps: int
    trainable_params: int
    adapter_params: int
    head_params: int
    final_loss: float | None
    eval: dict | None
    best: dict | None
    factor_entry: str
    cache_hit: bool
    resumed_from: int | None
    seconds: float
    lr: float | None = None  # R's learning rate as trained (the range test's choice with --lr auto)
    lr_find: dict | None = None  # --lr auto: the range test's summary


# ----------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        chosen = parse_device(device)
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank), chosen


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Prepared:
    """Everything the loop needs, built once."""

    config: TrainConfig
    tokenizer: object
    model: torch.nn.Module
    plan: object
    entry: object
    cache_hit: bool
    labels: list[str] | None
    train: list
    held_out: list
    head_names: list[str]
    data_sha256: str
    train_rows: int = 0  # rows of --data trained on (examples may be more: long texts are cut)


def prepare(config: TrainConfig, dist: Dist, device: torch.device, events: TrainEvents) -> Prepared:
    """Resolve the base, read the data, get the factors (running init on a miss), build the model."""
    from .initialize import FactorRequest, ensure_factors, plan_factors
    from .layer import inject
    from .models import backbone, head_kwargs, load_model, load_tokenizer, parse_targets

    rows = datamod.read_rows(config.data)
    config, inferred = with_task(config, rows)
    config = with_defaults(config)
    labels = datamod.label_names(rows, config.task)
    if config.eval_data:
        train_rows, held_rows = rows, datamod.read_rows(config.eval_data)
    elif config.eval_split:
        train_rows, held_rows = datamod.stratified_split(rows, config.eval_split, config.seed, config.task)
    else:
        train_rows, held_rows = rows, []

    request = FactorRequest(
        model=config.model,
        rank=config.rank,
        targets=parse_targets(config.targets),
        method=config.method,
        svd=SVDSettings.for_backend(config.svd, config.niter, config.oversample, config.seed),
        dtype=config.dtype,
        device=str(device) if device.type == "cuda" else None,
    )
    compute = None
    if config.method == "sb":
        from .initialize import sb_request

        all_reduce = torch.distributed.all_reduce if dist.enabled else None
        request, compute = sb_request(request, sb_init(config), all_reduce, (dist.rank, dist.world))
        if config.sb.get("official_eta"):
            events.message(f"LoRA-SB eta = {request.extra['sb']['eta']:.4g} (the official code's rule)")
    plan = plan_factors(request)
    check_architecture(config.task, plan.base.config, config.model)
    # Encode before any SVD so a bad row fails in seconds, not after minutes of factor computation.
    tokenizer = load_tokenizer(plan.base.resolved)
    limit = datamod.token_limit(tokenizer)
    if limit is not None and config.max_length > limit:  # data.encode cuts the examples there
        events.message(f"--max-length {config.max_length}: the model takes {limit} tokens; using {limit}")

    def encode(rows_):
        return datamod.encode(
            rows_,
            tokenizer,
            config.task,
            max_length=config.max_length,
            labels=labels,
            chat_loss=config.chat_loss,
        )

    train_examples, held_examples = encode(train_rows), encode(held_rows) if held_rows else []
    if inferred:  # said once the rows are known to fit it, so a bad row's error stays one line
        events.message(inferred)
    if plan.entry:
        events.message(f"factor cache hit: {plan.entry.id}")
    else:
        what = f"{len(plan.targets)} {config.method.upper()} factor pairs at rank {config.rank}"
        events.message(f"factor cache miss: computing {what}")
        if compute is not None and dist.enabled:
            # The gradient pass is collective: every process runs its share outside the cache lock,
            # then the first to take the lock writes the (identical) result.
            computed = compute(plan, None)
            compute = lambda plan_, on_module: computed  # noqa: E731
    entry, hit = ensure_factors(plan, compute=compute)

    torch.manual_seed(config.seed)  # a fresh task head is initialised from the run's seed
    model = load_model(plan.base.resolved, dtype=config.dtype, **head_kwargs(config.task, labels))
    model.to(device)
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    factors = entry.load(config.rank, plan.targets)
    core = backbone(model)
    initial_R = {m: torch.diag(f["S"]) for m, f in factors.items()} if config.method == "sb" else None
    inject(
        core,
        {m: (f["A"].to(device), f["B"].to(device)) for m, f in factors.items()},
        scaling=_scaling(config),
        R=initial_R,
        init_std=config.init_std,
        seed=config.seed,
    )
    head_names = []
    if config.task != "causal-lm":
        core_params = {id(p) for p in core.parameters()}
        for name, param in model.named_parameters():
            if id(param) not in core_params:
                param.requires_grad_(True)
                head_names.append(name)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    return Prepared(
        config,
        tokenizer,
        model,
        plan,
        entry,
        hit,
        labels,
        train_examples,
        held_examples,
        head_names,
        datamod.file_sha256(config.data),
        len(train_rows),
    )


def with_task(config: TrainConfig, rows: list) -> tuple[TrainConfig, str | None]:
    """The config with its task resolved (--task checked against the rows, or inferred from them), and
    the line that says so when it was inferred."""
    task, reason = resolve_task(config.task, rows, config.data)
    note = f"task: {task} (inferred from {reason}; pass --task to choose another)" if reason else None
    return replace(config, task=task), note


def sb_init(config: TrainConfig) -> SBInit:
    """LoRA-SB's gradient sample for a training run: drawn from the training rows only."""
    from .initialize import OfficialEta, SBInit, parse_bytes

    sb = config.sb
    official = sb.get("official_eta", False)  # eta from --lr, --warmup-ratio, --epochs: the official rule
    return SBInit(
        data=config.data,
        task=config.task,
        samples=sb.get("samples", 64),
        eta=sb.get("eta", DEFAULT_ETA),
        batch_size=sb.get("batch_size") or 8,
        max_length=config.max_length,
        seed=config.seed,
        held_out_split=0.0 if config.eval_data else config.eval_split or 0.0,
        max_grad_memory=parse_bytes(sb.get("max_grad_memory", "2GiB")),
        grad_mode=sb.get("grad_mode", "eval"),
        accum_dtype=sb.get("accum_dtype", "float32"),
        step=sb.get("step", "adam"),
        official_eta=OfficialEta(config.lr, config.warmup_ratio, config.epochs) if official else None,
    )


def _scaling(config: TrainConfig) -> float:
    if config.method == "sb":
        return 1.0
    return (config.alpha if config.alpha is not None else config.rank) / config.rank


# ----------------------------------------------------------------------------------------------
# Schedule and order


def total_steps(config: TrainConfig, examples: int, world: int) -> int:
    per_step = config.batch_size * world * config.grad_accum
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * math.ceil(examples / per_step)))


def step_indices(step: int, examples: int, per_step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): a fresh seeded permutation per epoch."""
    steps_per_epoch = math.ceil(examples / per_step)
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[offset * per_step : (offset + 1) * per_step].tolist()


def make_optimizer(model: torch.nn.Module, config: TrainConfig, head_names: list[str]):
    from .layer import xs_modules

    adapter_params = [m.R for m in xs_modules(model).values()]
    named = dict(model.named_parameters())
    groups = [{"params": adapter_params, "lr": config.lr, "weight_decay": config.weight_decay}]
    if head_names:
        groups.append(
            {
                "params": [named[n] for n in head_names],
                "lr": config.lr if config.head_lr is None else config.head_lr,  # 0: a frozen head
                "weight_decay": config.weight_decay,
            }
        )
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    return optimizer


def make_scheduler(optimizer, config: TrainConfig, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule)
    return get_scheduler(
        name, optimizer, num_warmup_steps=int((config.warmup_ratio or 0.0) * steps), num_training_steps=steps
    )


def autocast_for(precision: str, device: torch.device) -> Callable | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return None
    if precision not in ("bf16", "fp16"):
        raise UsageError(f"unknown --precision {precision!r}: use auto, fp32, bf16 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once it has its final name)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def trainable_state(model: torch.nn.Module, head_names: list[str]) -> tuple[dict, dict]:
    from .layer import xs_modules
    from .models import backbone

    layers = xs_modules(backbone(_unwrap(model)))
    R = {name: m.R.detach().float().cpu().clone() for name, m in layers.items()}
    named = dict(_unwrap(model).named_parameters())
    head = {n: named[n].detach().cpu().clone() for n in head_names}
    return R, head


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir, fsync, rename); prune to the `keep` newest."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        try:
            save_state(tmp, state)
        except OSError as error:
            reason = error.strerror or "the write failed"
            raise BadInputError(
                f"cannot write checkpoint {final}: {reason}; free disk space or use another --out"
            ) from None
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_stale_checkpoint_writes(run_dir: Path) -> None:
    """Temporary checkpoint directories of killed processes (.tmp-step-STEP-PID-...) are never listed as
    checkpoints; remove those whose process is gone so they do not pile up over many kills."""
    root = run_dir / CHECKPOINTS
    for tmp in root.glob(".tmp-step-*") if root.is_dir() else ():
        fields = tmp.name.split("-")
        pid = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None
        if pid is not None and not _process_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's state (JSON and safetensors only: nothing in a run directory can run code)."""
    return load_state(path)


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint; damaged ones (e.g. killed mid-write by an old version) are skipped.
    A pickled checkpoint of an older loraxs is refused (exit 3), never unpickled nor skipped."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return path, load_checkpoint(path)
        except LegacyCheckpointError:
            raise
        except BadInputError:
            continue
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------
# The run directory


# What an earlier run left in its directory, by name: `--force` removes exactly these and nothing else.
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png")
RUN_ADAPTERS = ("adapter", "best")
RUN_TEMP_PREFIXES = (
    ".config.yaml.tmp-", ".metrics.jsonl.tmp-", ".adapter.tmp-", ".adapter.old-", ".best.tmp-",
    ".best.old-", ".write-test-",
)  # fmt: skip


@dataclass
class RunStart:
    """What `train` does with --out; `train --dry-run` reports the same, from the same code."""

    action: str  # "new", "resume" (from `found`) or "fresh" (remove `replaces`, then a new run)
    found: tuple[Path, dict] | None = None
    replaces: list[Path] = field(default_factory=list)

    def describe(self) -> str | None:
        if self.action == "resume":
            return f"from {self.found[0]} (step {self.found[1]['step']})"
        return None


def plan_run_dir(config: TrainConfig) -> RunStart:
    """Resume, start, or (resume="fresh", `--force`) replace the run in --out; refuses what `train` would
    refuse (exit 3): a checkpoint with other settings, a checkpoint with --no-resume, none with --resume."""
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"--out {run_dir} is a file, not a run directory")
    if config.resume == "fresh":
        replaces = earlier_run(run_dir)
        return RunStart("fresh", replaces=replaces) if replaces else RunStart("new")
    found = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if config.resume == "always" and found is None:
        raise BadInputError(f"--resume: no checkpoint in {run_dir}")
    if found and config.resume == "never":
        raise BadInputError(
            f"{run_dir} holds checkpoints of an earlier run; resume it (default), replace it with --force, "
            "or use another --out"
        )
    if found:
        saved = found[1].get("identity", {})
        changed = sorted(k for k in IDENTITY if saved.get(k) != config.identity().get(k))
        if changed:
            raise BadInputError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}); use another --out, "
                "or --force to replace that run"
            )
        return RunStart("resume", found)
    return RunStart("new")


def earlier_run(run_dir: Path) -> list[Path]:
    """The files and directories `train` wrote in `run_dir` (never a symlink, never anything else).

    A directory that holds such names but neither a `train` config nor a checkpoint is not taken
    for a run directory: nothing in it is removed (BadInputError)."""
    if not run_dir.is_dir():
        return []

    def own(path: Path) -> bool:
        return path.exists() and not path.is_symlink()

    from .adapter import is_adapter_dir

    found = [run_dir / n for n in RUN_FILES if own(run_dir / n) and (run_dir / n).is_file()]
    found += [run_dir / n for n in RUN_ADAPTERS if own(run_dir / n) and is_adapter_dir(run_dir / n)]
    found += [p for p in run_dir.iterdir() if p.name.startswith(RUN_TEMP_PREFIXES) and not p.is_symlink()]
    checkpoints = run_dir / CHECKPOINTS
    if own(checkpoints) and checkpoints.is_dir():
        found += [
            p
            for p in checkpoints.iterdir()
            if not p.is_symlink()
            and (p.name.startswith(".tmp-step-") or p.name.removeprefix("step-").isdigit())
        ]
    if found and not (_is_train_config(run_dir / "config.yaml") or checkpoint_dirs(run_dir)):
        raise BadInputError(
            f"{run_dir} is not a loraxs run directory (no config.yaml of `loraxs train`, no checkpoint); "
            "--force removes nothing there: use another --out"
        )
    return sorted(found)


def _is_train_config(path: Path) -> bool:
    import yaml

    if path.is_symlink() or not path.is_file():
        return False
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(document, dict) and {"model", "data", "rank"} <= set(document)


def _remove_earlier_run(run_dir: Path, paths: list[Path]) -> None:
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:
            raise BadInputError(f"--force: cannot remove {path}: {error.strerror}") from None
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()


def _prepare_run_dir(config: TrainConfig, dist: Dist) -> tuple[Path, tuple[Path, dict] | None]:
    run_dir = Path(config.out)
    start = plan_run_dir(config)
    if start.action == "fresh":
        dist.barrier()  # every process has looked before the first one removes
        if dist.main:
            _remove_earlier_run(run_dir, start.replaces)
        dist.barrier()
    if dist.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise BadInputError(f"cannot write the run directory {run_dir}: {error.strerror}") from None
    return run_dir, start.found


# config.yaml: the settings under the names of `loraxs train`'s long options, so that
# `loraxs train --config RUN/config.yaml` repeats the run; what the run found goes under `recorded:`,
# which --config skips. `resume` says how to treat --out, not what the run is: it is not written.
RECORDED = "recorded"
NOT_WRITTEN = ("resume",)
SB_OPTIONS = {"eta": "sb_lr", "max_grad_memory": "max_grad_memory"}  # the others: sb_<key>
CONFIG_HEADER = (
    "# loraxs train settings: `loraxs train --config THIS_FILE` repeats the run (flags on the command\n"
    "# line win). `recorded` is what the run found; --config skips it.\n"
)


def settings_document(config: TrainConfig) -> dict:
    """The run's settings keyed by option name (`out`, `lr`, `sb_samples`, ...)."""
    document = {k: v for k, v in asdict(config).items() if k not in NOT_WRITTEN and k != "sb"}
    document.update({SB_OPTIONS.get(k, f"sb_{k}"): v for k, v in config.sb.items()})
    return document


def _write_config(run_dir: Path, config: TrainConfig, extra: dict) -> None:
    import yaml

    from . import __version__

    document = {**settings_document(config), RECORDED: {**extra, "loraxs_version": __version__}}
    _write_atomic(run_dir / "config.yaml", CONFIG_HEADER + yaml.safe_dump(document, sort_keys=False))


def _write_atomic(path: Path, text: str) -> None:
    """Temp sibling, then rename: a kill or a full disk never leaves a half-written file in place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


def _trim_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the file reads as one uninterrupted run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a metrics row; a blank or torn row (a run killed mid-append) counts as never logged."""
    try:
        row = json.loads(line)
    except ValueError:
        return math.inf
    step = row.get("step", 0) if isinstance(row, dict) else None
    return step if isinstance(step, int | float) else math.inf


# ----------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, events: TrainEvents | None = None) -> TrainResult:
    config.validate()
    events = events or TrainEvents()
    started = time.perf_counter()
    dist, device = init_distributed(config.device)
    # The task first: it is part of the run's identity that a resume is checked against.
    given = config
    config, inferred = with_task(config, datamod.read_rows(config.data))
    config = with_defaults(config)
    created = not Path(config.out).exists()
    run_dir, found = _prepare_run_dir(config, dist)
    try:
        prep = prepare(given if inferred else config, dist, device, events)  # it says what it inferred
        config = prep.config
    except BaseException:
        if created and dist.main and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before training (a bad row, an unfit model): leave nothing behind
        raise
    if not prep.train:
        raise BadInputError(f"{config.data}: no usable training examples")
    model = prep.model
    per_step = config.batch_size * dist.world * config.grad_accum
    steps = total_steps(config, len(prep.train), dist.world)
    autocast = autocast_for(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    metric = config.metric or default_metric(config.task)
    pad_id = datamod.pad_id_of(prep.tokenizer)
    model.train()
    # --lr auto: the range test picks R's lr (a resumed run takes the one its first start picked); the
    # identity keeps "auto", the optimizer, scheduler and adapter card get the number.
    lr_found, lr_row = None, None
    if config.lr == AUTO_LR:
        if found:
            lr_found = found[1].get("lr_find")
            if lr_found is None:
                raise BadInputError(f"{found[0]}: no --lr auto result in this checkpoint; pass --lr")
        else:
            forward_backward = _step_runner(config, dist, device, autocast, None, pad_id)
            found_lr = find_lr(config, prep, forward_backward, dist, events)
            lr_found, lr_row = found_lr.summary(), found_lr.row()
        prep.config = replace(config, lr=lr_found["lr"])
    run_config = prep.config
    optimizer = make_optimizer(model, run_config, prep.head_names)
    scheduler = make_scheduler(optimizer, run_config, steps)
    step, best, resumed_from = 0, None, None
    if found:
        path, state = found
        _restore(model, optimizer, scheduler, state)
        step, best, resumed_from = state["step"], state.get("best"), state["step"]
        events.message(f"resuming from {path} (step {step} of {steps})")
    if dist.main:  # also with no checkpoint: a run killed before its first one logged rows already
        _trim_metrics(run_dir, step if found else -1)  # a fresh start keeps no rows, not even step 0's
        _remove_stale_checkpoint_writes(run_dir)
        if lr_row is not None:
            _append_metrics(run_dir, lr_row)
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if dist.main:
        recorded = {"factor_entry": prep.entry.id, "world_size": dist.world, "labels": prep.labels}
        if lr_found is not None:
            recorded["lr_find"] = lr_found
        _write_config(run_dir, config, recorded)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def evaluate_now() -> dict | None:
        if not prep.held_out or not dist.main:
            return None
        return evaluate_examples(
            _unwrap(model),
            prep.held_out,
            config.task,
            batch_size=config.eval_batch_size or config.batch_size,
            pad_id=pad_id,
            device=device,
            autocast=autocast,
        )

    def checkpoint_state(at: int) -> dict:
        R, head = trainable_state(model, prep.head_names)
        return {
            "step": at,
            "R": R,
            "head": head,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "best": best,
            "identity": config.identity(),
            "data_position": _position(at, per_step, len(prep.train)),
            "lr_find": lr_found,
        }

    def save(at: int) -> None:
        if dist.main:
            save_checkpoint(run_dir, at, checkpoint_state(at), config.keep_checkpoints)

    events.start(step, steps)
    last_loss, window_tokens, window_start = None, 0, time.perf_counter()
    last_saved = step
    forward_backward = _step_runner(config, dist, device, autocast, scaler, pad_id)
    try:
        while step < steps:
            indices = step_indices(step, len(prep.train), per_step, config.seed)
            loss_total, tokens, total_terms = forward_backward(model, [prep.train[i] for i in indices])
            mean_loss = loss_total / max(total_terms, 1)
            if not math.isfinite(mean_loss):
                kept = checkpoint_dirs(run_dir)
                where = f"; last good checkpoint: {kept[-1]}" if kept else ""
                raise DivergedError(
                    f"training diverged: loss is {mean_loss} at step {step + 1}{where}; lower --lr"
                )
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = mean_loss
            window_tokens += int(tokens)
            elapsed = time.perf_counter() - window_start
            row = {
                "step": step,
                "loss": mean_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": window_tokens / max(elapsed, 1e-9),
            }
            events.step(row)
            if dist.main and (step % config.log_every == 0 or step == steps):
                _append_metrics(run_dir, {**row, "epoch": round(step * per_step / len(prep.train), 4)})
                window_tokens, window_start = 0, time.perf_counter()
            if config.eval_every and step % config.eval_every == 0 and step < steps:
                best = _evaluate_and_keep(
                    prep, model, run_dir, step, metric, best, evaluate_now(), events, dist, mean_loss
                )
            if config.save_every and step % config.save_every == 0:
                save(step)
                last_saved = step
    except KeyboardInterrupt:
        if step > last_saved:
            save(step)
        events.message(f"interrupted at step {step}: checkpoint written to {run_dir / CHECKPOINTS}")
        raise
    final_eval = evaluate_now()
    best = _evaluate_and_keep(prep, model, run_dir, step, metric, best, final_eval, events, dist, last_loss)
    if step > last_saved:
        save(step)
    adapter_dir = run_dir / "adapter"
    if dist.main:
        R, head = trainable_state(model, prep.head_names)
        _save_adapter(prep, adapter_dir, R, head, _card_metrics(step, last_loss, final_eval, best))
        _plot(run_dir)
    dist.barrier()
    return TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        best_dir=run_dir / "best" if best else None,
        steps=step,
        trainable_params=sum(p.numel() for p in trainable),
        adapter_params=sum(r.numel() for r in trainable_state(model, [])[0].values()),
        head_params=sum(p.numel() for n, p in _unwrap(model).named_parameters() if n in prep.head_names),
        final_loss=last_loss,
        eval=final_eval,
        best=best,
        factor_entry=prep.entry.id,
        cache_hit=prep.cache_hit,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        lr=run_config.lr,
        lr_find=lr_found,
    )


def _step_runner(config: TrainConfig, dist: Dist, device, autocast, scaler, pad_id: int) -> Callable:
    """`run(model, examples) -> (summed loss, tokens, loss terms)`: the forward and backward passes of one
    optimizer step over `examples` (this process takes its slice of each micro-batch), gradients
    accumulated into the model; loss and tokens are summed over all processes."""

    def run(model, step_examples: list) -> tuple[float, float, int]:
        total_terms = sum(e.num_targets for e in step_examples)
        loss_total, tokens = 0.0, 0
        micro = config.batch_size * dist.world
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        for k in range(config.grad_accum):
            chunk = step_examples[k * micro : (k + 1) * micro][dist.rank :: dist.world]
            if not chunk:
                continue
            batch = datamod.collate(chunk, pad_id, config.task)
            sync = k == config.grad_accum - 1 or not ddp
            with nullcontext() if sync else model.no_sync(), autocast() if autocast else nullcontext():
                logits = model(**model_inputs(batch, device)).logits
            summed, _ = loss_sum(logits, batch["labels"].to(device), config.task)
            # DDP averages gradients over processes: scale so the result is the global mean.
            loss = summed * (dist.world / max(total_terms, 1))
            (scaler.scale(loss) if scaler else loss).backward()
            loss_total += float(summed.detach())
            tokens += int(batch["attention_mask"].sum())
        loss_total, tokens = dist.sum([loss_total, float(tokens)])
        return loss_total, tokens, total_terms

    return run


def find_lr(config: TrainConfig, prep: Prepared, forward_backward: Callable, dist: Dist, events: TrainEvents):
    """`--lr auto`: the LR range test (lr_finder.py) on R, on the run's own first batches, before the
    model is wrapped for DDP (gradients are averaged across processes by hand); everything it changes
    is restored. Returns the LRFindResult."""
    from .lr_finder import LRFindSettings, lr_range_test

    model = prep.model
    settings = LRFindSettings(steps=config.lr_find_steps)
    per_step = config.batch_size * dist.world * config.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    events.message(
        f"--lr auto: LR range test, {settings.steps} steps from {settings.min_lr:g} to {settings.max_lr:g}"
    )

    def step_loss(k: int) -> float:
        examples = [prep.train[i] for i in step_indices(k, len(prep.train), per_step, config.seed)]
        loss_total, _, total_terms = forward_backward(model, examples)
        return loss_total / max(total_terms, 1)

    def set_lr(optimizer, lr: float) -> None:
        optimizer.param_groups[0]["lr"] = lr  # R's group; a head's group keeps its lr

    def average(grads: list[torch.Tensor]) -> None:
        for grad in grads:
            torch.distributed.all_reduce(grad)
            grad.div_(dist.world)

    def progress(k: int, lr: float, loss: float) -> None:
        if (k + 1) % 10 == 0:
            events.message(f"--lr auto: step {k + 1}/{settings.steps}, lr {lr:.2e}, loss {loss:.4f}")

    def from_rank0(lr: float) -> float:
        value = torch.tensor([lr], dtype=torch.float64, device=params[0].device)
        torch.distributed.broadcast(value, src=0)
        return float(value.item())

    result = lr_range_test(
        params,
        lambda lr: make_optimizer(model, replace(config, lr=lr), prep.head_names),
        set_lr,
        step_loss,
        settings=settings,
        max_grad_norm=config.max_grad_norm,
        all_reduce_grads=average if dist.enabled else None,
        broadcast=from_rank0 if dist.enabled else None,
        on_step=progress,
    )
    rules = {"valley": "half-way down the longest descent", "min/10": "minimum loss / 10"}
    how = rules.get(result.rule, result.rule)
    events.message(f"--lr auto: R's lr {result.lr:.3g} ({how} of the smoothed loss)")
    return result


def _position(step: int, per_step: int, examples: int) -> dict:
    steps_per_epoch = math.ceil(examples / per_step)
    epoch, offset = divmod(step, steps_per_epoch)
    return {"epoch": epoch, "example": offset * per_step, "examples_per_step": per_step}


def _restore(model, optimizer, scheduler, state: dict) -> None:
    from .layer import xs_modules
    from .models import backbone

    layers = xs_modules(backbone(model))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["R"].items():
            layers[name].R.copy_(value)
        for name, value in state["head"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def _evaluate_and_keep(
    prep, model, run_dir, step, metric, best, metrics, events, dist, train_loss: float | None = None
) -> dict | None:
    """Log an evaluation; keep RUN/best when it improves on the best so far (`evaluate.improves`:
    ties on --metric go to the lower eval loss, then to the later step)."""
    if metrics is None:
        return best
    if metric not in metrics:
        raise UsageError(
            f"--metric {metric!r} is not measured for {prep.config.task}: use one of {sorted(metrics)}"
        )
    row = {"step": step, "eval": metrics}
    events.evaluated(row)
    _append_metrics(run_dir, row)
    if improves(metric, metrics, best):
        best = {"step": step, "metric": metric, "value": metrics[metric], "metrics": metrics}
        R, head = trainable_state(model, prep.head_names)
        _save_adapter(prep, run_dir / "best", R, head, _card_metrics(step, train_loss, metrics))
    return best


def _save_adapter(prep: Prepared, out: Path, R: dict, head: dict, metrics: dict) -> None:
    from .adapter import new_config, save_adapter

    config = prep.config
    data = {
        "path": str(config.data),
        "file": Path(config.data).name,
        "sha256": prep.data_sha256,
        "task": config.task,
        "rows": prep.train_rows,
        "examples": len(prep.train),
        "eval_examples": len(prep.held_out),
        "eval_data": Path(config.eval_data).name if config.eval_data else None,
        "eval_split": config.eval_split if not config.eval_data else None,
    }
    extra = {
        "data": data,
        "metrics": metrics,
        "training": {
            k: getattr(config, k) for k in ("lr", "head_lr", "batch_size", "grad_accum", "seed", "schedule")
        },
    }
    sb = prep.entry.meta.get("recipe", {}).get("extra", {}).get("sb")
    if sb:
        extra["sb"] = sb
    adapter_config = new_config(
        prep.plan.base,
        prep.entry,
        rank=config.rank,
        alpha=config.alpha,
        modules=sorted(R),
        task=config.task,
        labels=prep.labels,
        extra=extra,
    )
    factors = None
    if config.embed_factors:
        factors = prep.entry.load(config.rank, sorted(R))
    save_adapter(out, adapter_config, R, head=head, factors=factors)


def _card_metrics(
    steps: int, train_loss: float | None, evaluated: dict | None, best: dict | None = None
) -> dict:
    """The adapter's metrics, each named for what it measures: `train_loss` (the last training step),
    `eval_<name>` (the held-out data at `steps`), `best_step` and `best_<metric>` (RUN/best)."""
    flat: dict = {"steps": steps}
    if train_loss is not None:
        flat["train_loss"] = round(train_loss, 4)
    for key, value in (evaluated or {}).items():
        if isinstance(value, float):
            flat[f"eval_{key}"] = round(value, 4)
    if evaluated:
        flat["eval_examples"] = evaluated.get("examples")
    if best:
        flat["best_step"] = best["step"]
        flat[f"best_{best['metric']}"] = round(best["value"], 4)
    return flat


def _plot(run_dir: Path) -> None:
    """loss.png: training loss per logged step, and eval loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval" in r]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if eval_rows:
        axis.plot(
            [r["step"] for r in eval_rows], [r["eval"]["loss"] for r in eval_rows], "o-", label="eval loss"
        )
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png")
    plt.close(figure)


def plan_training(config: TrainConfig, measure: bool = True) -> dict:
    """What `train` would do: cache hit or miss, sizes, steps, the learning rates it would use; with
    `measure`, also the time per step, timed on one real batch (`measure_step`: loads the weights)."""
    from .initialize import FactorRequest, plan_factors
    from .models import parse_targets

    config.validate()
    rows = datamod.read_rows(config.data)
    config, inferred = with_task(config, rows)
    config = with_defaults(config)
    start = plan_run_dir(config)  # the same decision, and the same refusals, as the real run
    labels = datamod.label_names(rows, config.task)
    held = (
        len(datamod.read_rows(config.eval_data)) if config.eval_data else int(len(rows) * config.eval_split)
    )
    request = FactorRequest(
        model=config.model,
        rank=config.rank,
        targets=parse_targets(config.targets),
        method=config.method,
        svd=SVDSettings.for_backend(config.svd, config.niter, config.oversample, config.seed),
        dtype=config.dtype,
    )
    if config.method == "sb":
        from .initialize import sb_request

        request, _ = sb_request(request, sb_init(config))
    plan = plan_factors(request)
    check_architecture(config.task, plan.base.config, config.model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    hidden = getattr(plan.base.config, "hidden_size", 0)
    head = 0 if config.task == "causal-lm" else hidden * len(labels or [0]) + len(labels or [0])
    train_rows = len(rows) - (0 if config.eval_data else held)
    item = torch.empty((), dtype=plan.base.weights_dtype).element_size()
    summary = {
        "model": plan.base.resolved.spec,
        "out": config.out,
        "method": config.method,
        "rank": config.rank,
        "modules": len(plan.targets),
        "cache": f"hit ({plan.entry.id})" if plan.entry else "miss: init runs first",
        "adapter_params": config.rank * config.rank * len(plan.targets),
        "head_params": head,
        "train_examples": train_rows,
        "eval_examples": held,
        "steps": total_steps(config, train_rows, world),
        "examples_per_step": config.batch_size * world * config.grad_accum,
        "weights_bytes": plan.base.total_params * item,
        "task": config.task,
        "task_inferred": bool(inferred),
        "start": start.action,
        "resume": start.describe(),
        "replaces": [str(p.relative_to(config.out)) for p in start.replaces],
        "lr": config.lr,
        "head_lr": config.head_lr if config.task != "causal-lm" else None,
        "warmup_ratio": config.warmup_ratio,
    }
    if measure:
        remaining = summary["steps"] - (start.found[1]["step"] if start.found else 0)
        extra_steps = config.lr_find_steps if config.lr == AUTO_LR and not start.found else 0
        summary.update(measure_step(config, plan, rows, labels, remaining + extra_steps))
    return summary


def measure_step(config: TrainConfig, plan, rows: list, labels: list[str] | None, steps: int) -> dict:
    """Time one optimizer step of the run's shape on real rows: the base with frozen factors of the planned
    shapes but random values (the time does not depend on them, and the factor cache is neither read
    nor written), one real micro-batch of --batch-size examples drawn as step 1 would draw them, the
    second of two steps timed (the first pays for allocation and warm-up), times --grad-accum.
    `steps` optimizer steps of that time give the estimate (evaluation passes are not included)."""
    from .layer import inject
    from .models import backbone, head_kwargs, load_model, load_tokenizer, weight_matrix

    device = parse_device(config.device)
    tokenizer = load_tokenizer(plan.base.resolved)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
    sample = [rows[i] for i in order[: 4 * config.batch_size]]
    examples = datamod.encode(
        sample, tokenizer, config.task, max_length=config.max_length, labels=labels,
        chat_loss=config.chat_loss,
    )  # fmt: skip
    if not examples:
        raise BadInputError(f"{config.data}: no usable training examples")
    batch = [examples[i] for i in step_indices(0, len(examples), config.batch_size, config.seed)]
    model = load_model(plan.base.resolved, dtype=config.dtype, **head_kwargs(config.task, labels)).to(device)
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    core = backbone(model)
    modules = dict(core.named_modules())
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for name in plan.targets:
        weight = weight_matrix(modules[name])
        m, n = weight.shape
        A = torch.randn(config.rank, n, generator=generator) / math.sqrt(n)
        B = torch.randn(m, config.rank, generator=generator) / math.sqrt(config.rank)
        factors[name] = (A.to(device, weight.dtype), B.to(device, weight.dtype))
    inject(core, factors, scaling=_scaling(config), init_std=config.init_std, seed=config.seed)
    core_params = {id(p) for p in core.parameters()}
    head_names = [n for n, p in model.named_parameters() if id(p) not in core_params]
    if config.task != "causal-lm":
        for name, param in model.named_parameters():
            if name in head_names:
                param.requires_grad_(True)
    else:
        head_names = []
    if config.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    timing = replace(config, lr=1e-3 if config.lr == AUTO_LR else config.lr, grad_accum=1)
    optimizer = make_optimizer(model, timing, head_names)
    runner = _step_runner(timing, Dist(), device, autocast_for(config.precision, device), None,
                          datamod.pad_id_of(tokenizer))  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    rng = rng_state()  # dropout draws from the global generator: leave it as it was
    seconds = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        runner(model, batch)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - begin)
    set_rng_state(rng)
    step_seconds = seconds[-1] * config.grad_accum
    total = step_seconds * steps
    return {
        "step_seconds": step_seconds,
        "estimated_seconds": total,
        "estimate": about(total),
        "measured_on": str(device),
    }


def about(seconds: float) -> str:
    """'about 40 seconds', 'about 14 minutes', 'about 2.5 hours'."""
    if seconds < 1.5:
        return "about 1 second"
    if seconds < 90:
        return f"about {round(seconds)} seconds"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} minutes"
    return f"about {seconds / 3600:.1f} hours"
