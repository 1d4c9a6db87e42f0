"""`train`: fine-tune the R matrices (and a task head) of a LoRA-XS / LoRA-SB adapter.

One loop serves one process and torchrun: with WORLD_SIZE > 1 the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU). Every process sees the same global order of
examples; each optimizer step takes `batch_size * world * grad_accum` of them, rank k the k-th
slice of each micro-batch. Losses are normalised by the global number of loss terms, so N
processes give the same update as one process with the same global batch.

The run directory:

    RUN_DIR/config.yaml          the resolved settings
    RUN_DIR/metrics.jsonl        step, loss, lr, tokens/s; eval rows
    RUN_DIR/checkpoints/step-N/  state.pt: R, head, optimizer, scheduler, RNG, data position
    RUN_DIR/adapter/             the final adapter;  RUN_DIR/best/  the best by --metric
    RUN_DIR/loss.png             the loss curve
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import data as datamod
from .errors import BadInputError, DivergedError, UsageError
from .evaluate import default_metric, evaluate_examples, is_better, loss_sum, model_inputs
from .factors import SVDSettings
from .sb import DEFAULT_ETA

if TYPE_CHECKING:
    from .initialize import SBInit

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
SCHEDULES = ("linear", "cosine", "constant")
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
    "weight_decay",
)


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    task: str = "causal-lm"
    method: str = "xs"
    rank: int = 16
    alpha: float | None = None  # default r (scaling 1); LoRA-SB always uses scaling 1
    targets: str | None = None
    eval_data: str | None = None
    eval_split: float = 0.0
    max_length: int = 512
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 1e-3
    head_lr: float | None = None  # the paper's "classifier LR"; default: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
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
    niter: int = 4
    oversample: int = 16
    embed_factors: bool = False
    resume: str = "auto"  # auto: continue a run found in --out; always: require one; never: refuse one
    sb: dict = field(default_factory=dict)  # LoRA-SB init settings (see sb.py)

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def validate(self) -> None:
        datamod.check_task(self.task)
        if self.method not in ("xs", "sb"):
            raise UsageError(f"unknown --method {self.method!r}: use xs or sb")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown --schedule {self.schedule!r}: use {', '.join(SCHEDULES)}")
        if self.resume not in ("auto", "always", "never"):
            raise UsageError(f"--resume must be auto, always or never, not {self.resume!r}")
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
        if self.epochs <= 0 or self.lr <= 0:
            raise UsageError("--epochs and --lr must be positive")


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
        chosen = torch.device(device)
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


def prepare(config: TrainConfig, dist: Dist, device: torch.device, events: TrainEvents) -> Prepared:
    """Resolve the base, read the data, get the factors (running init on a miss), build the model."""
    from .initialize import FactorRequest, ensure_factors, plan_factors
    from .layer import inject
    from .models import backbone, head_kwargs, load_model, load_tokenizer, parse_targets

    rows = datamod.read_rows(config.data)
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
        svd=SVDSettings(config.svd, config.niter, config.oversample, config.seed),
        dtype=config.dtype,
        device=str(device) if device.type == "cuda" else None,
    )
    compute = None
    if config.method == "sb":
        from .initialize import sb_request

        all_reduce = torch.distributed.all_reduce if dist.enabled else None
        request, compute = sb_request(request, sb_init(config), all_reduce, (dist.rank, dist.world))
    plan = plan_factors(request)
    # Encode before any SVD so a bad row fails in seconds, not after minutes of factor computation.
    tokenizer = load_tokenizer(plan.base.resolved)

    def encode(rows_):
        return datamod.encode(rows_, tokenizer, config.task, max_length=config.max_length, labels=labels)

    train_examples, held_examples = encode(train_rows), encode(held_rows) if held_rows else []
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
    )


def sb_init(config: TrainConfig) -> SBInit:
    """LoRA-SB's gradient sample for a training run: drawn from the training rows only."""
    from .initialize import SBInit, parse_bytes

    sb = config.sb
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
                "lr": config.head_lr or config.lr,
                "weight_decay": config.weight_decay,
            }
        )
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    return optimizer


def make_scheduler(optimizer, config: TrainConfig, steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule)
    return get_scheduler(
        name, optimizer, num_warmup_steps=int(config.warmup_ratio * steps), num_training_steps=steps
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
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def trainable_state(model: torch.nn.Module, head_names: list[str]) -> tuple[dict, dict]:
    from .layer import xs_modules
    from .models import backbone

    layers = xs_modules(backbone(_unwrap(model)))
    R = {name: m.R.detach().float().cpu().clone() for name, m in layers.items()}
    named = dict(_unwrap(model).named_parameters())
    head = {n: named[n].detach().cpu().clone() for n in head_names}
    return R, head


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir, fsync, rename); prune to the `keep` newest."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        try:
            with open(tmp / STATE_FILE, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
            reason = error.strerror if isinstance(error, OSError) else "the write failed"
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
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as error:  # a damaged pickle raises many types
        raise BadInputError(f"{path}: damaged checkpoint ({error})".splitlines()[0]) from None


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint; damaged ones (e.g. killed mid-write by an old version) are skipped."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return path, load_checkpoint(path)
        except BadInputError:
            continue
    return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------------
# The run directory


def _prepare_run_dir(config: TrainConfig, dist: Dist) -> tuple[Path, tuple[Path, dict] | None]:
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BadInputError(f"--out {run_dir} is a file, not a run directory")
    found = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if config.resume == "always" and found is None:
        raise BadInputError(f"--resume: no checkpoint in {run_dir}")
    if found and config.resume == "never":
        raise BadInputError(
            f"{run_dir} holds checkpoints of an earlier run; resume it (default), or use another --out"
        )
    if found:
        saved = found[1].get("identity", {})
        changed = sorted(k for k in IDENTITY if saved.get(k) != config.identity().get(k))
        if changed:
            raise BadInputError(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}); "
                "use another --out to start a new run"
            )
    if dist.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise BadInputError(f"cannot write the run directory {run_dir}: {error.strerror}") from None
    return run_dir, found


def _write_config(run_dir: Path, config: TrainConfig, extra: dict) -> None:
    import yaml

    document = {**asdict(config), **extra}
    _write_atomic(run_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False))


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
    run_dir, found = _prepare_run_dir(config, dist)
    prep = prepare(config, dist, device, events)
    if not prep.train:
        raise BadInputError(f"{config.data}: no usable training examples")
    model = prep.model
    per_step = config.batch_size * dist.world * config.grad_accum
    steps = total_steps(config, len(prep.train), dist.world)
    optimizer = make_optimizer(model, config, prep.head_names)
    scheduler = make_scheduler(optimizer, config, steps)
    autocast = autocast_for(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    metric = config.metric or default_metric(config.task)
    step, best, resumed_from = 0, None, None
    if found:
        path, state = found
        _restore(model, optimizer, scheduler, state)
        step, best, resumed_from = state["step"], state.get("best"), state["step"]
        events.message(f"resuming from {path} (step {step} of {steps})")
    if dist.main:  # also with no checkpoint: a run killed before its first one logged rows already
        _trim_metrics(run_dir, step)
        _remove_stale_checkpoint_writes(run_dir)
    model.train()
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if dist.main:
        _write_config(
            run_dir, config, {"factor_entry": prep.entry.id, "world_size": dist.world, "labels": prep.labels}
        )
    pad_id = datamod.pad_id_of(prep.tokenizer)
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
            "rng": _rng_state(),
            "best": best,
            "identity": config.identity(),
            "data_position": _position(at, per_step, len(prep.train)),
        }

    def save(at: int) -> None:
        if dist.main:
            save_checkpoint(run_dir, at, checkpoint_state(at), config.keep_checkpoints)

    events.start(step, steps)
    last_loss, window_tokens, window_start = None, 0, time.perf_counter()
    last_saved = step
    try:
        while step < steps:
            indices = step_indices(step, len(prep.train), per_step, config.seed)
            step_examples = [prep.train[i] for i in indices]
            total_terms = sum(e.num_targets for e in step_examples)
            loss_total, tokens = 0.0, 0
            micro = config.batch_size * dist.world
            for k in range(config.grad_accum):
                chunk = step_examples[k * micro : (k + 1) * micro][dist.rank :: dist.world]
                if not chunk:
                    continue
                batch = datamod.collate(chunk, pad_id, config.task)
                sync = k == config.grad_accum - 1 or not dist.enabled
                with nullcontext() if sync else model.no_sync(), autocast() if autocast else nullcontext():
                    logits = model(**model_inputs(batch, device)).logits
                summed, _ = loss_sum(logits, batch["labels"].to(device), config.task)
                # DDP averages gradients over processes: scale so the result is the global mean.
                loss = summed * (dist.world / max(total_terms, 1))
                (scaler.scale(loss) if scaler else loss).backward()
                loss_total += float(summed.detach())
                tokens += int(batch["attention_mask"].sum())
            loss_total, tokens = dist.sum([loss_total, float(tokens)])
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
                    prep, model, run_dir, step, metric, best, evaluate_now(), events, dist
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
    best = _evaluate_and_keep(prep, model, run_dir, step, metric, best, final_eval, events, dist)
    if step > last_saved:
        save(step)
    adapter_dir = run_dir / "adapter"
    if dist.main:
        R, head = trainable_state(model, prep.head_names)
        _save_adapter(
            prep, adapter_dir, R, head, {"final": final_eval, "best": best, "loss": last_loss, "steps": step}
        )
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
    )


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
    _set_rng_state(state["rng"])


def _evaluate_and_keep(prep, model, run_dir, step, metric, best, metrics, events, dist) -> dict | None:
    if metrics is None:
        return best
    if metric not in metrics:
        raise UsageError(
            f"--metric {metric!r} is not measured for {prep.config.task}: use one of {sorted(metrics)}"
        )
    row = {"step": step, "eval": metrics}
    events.evaluated(row)
    _append_metrics(run_dir, row)
    if is_better(metric, metrics[metric], best["value"] if best else None):
        best = {"step": step, "metric": metric, "value": metrics[metric], "metrics": metrics}
        R, head = trainable_state(model, prep.head_names)
        _save_adapter(prep, run_dir / "best", R, head, {"best": best})
    return best


def _save_adapter(prep: Prepared, out: Path, R: dict, head: dict, metrics: dict) -> None:
    from .adapter import new_config, save_adapter

    config = prep.config
    extra = {
        "data": {"path": str(config.data), "sha256": prep.data_sha256, "examples": len(prep.train)},
        "metrics": _card_metrics(metrics),
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


def _card_metrics(metrics: dict) -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            inner = value.get("metrics", value)
            flat.update({f"{key}_{k}": round(v, 4) for k, v in inner.items() if isinstance(v, float)})
        elif isinstance(value, float):
            flat[key] = round(value, 4)
        elif value is not None:
            flat[key] = value
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


def plan_training(config: TrainConfig) -> dict:
    """What `train` would do, without loading weights: cache hit or miss, sizes, steps."""
    from .initialize import FactorRequest, plan_factors
    from .models import parse_targets

    config.validate()
    rows = datamod.read_rows(config.data)
    labels = datamod.label_names(rows, config.task)
    held = (
        len(datamod.read_rows(config.eval_data)) if config.eval_data else int(len(rows) * config.eval_split)
    )
    request = FactorRequest(
        model=config.model,
        rank=config.rank,
        targets=parse_targets(config.targets),
        method=config.method,
        svd=SVDSettings(config.svd, config.niter, config.oversample, config.seed),
        dtype=config.dtype,
    )
    if config.method == "sb":
        from .initialize import sb_request

        request, _ = sb_request(request, sb_init(config))
    plan = plan_factors(request)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    hidden = getattr(plan.base.config, "hidden_size", 0)
    head = 0 if config.task == "causal-lm" else hidden * len(labels or [0]) + len(labels or [0])
    found = latest_checkpoint(Path(config.out)) if Path(config.out).is_dir() else None
    train_rows = len(rows) - (0 if config.eval_data else held)
    item = torch.empty((), dtype=plan.base.weights_dtype).element_size()
    return {
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
        "resume": f"from {found[0]}" if found else None,
    }
