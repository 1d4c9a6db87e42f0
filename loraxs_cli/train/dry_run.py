"""`train --dry-run`: what `train` would do, from the same steps the run takes (the run directory's
decision and refusals, the held-out split, the factor request), and an estimate of its time measured
on one real batch."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from .. import data as datamod
from ..checkpoint import rng_state, set_rng_state
from ..devices import parse_device
from ..errors import BadInputError
from ..initialize import plan_factors
from ..layer import inject
from ..linear import compute_dtype, weight_shape
from ..models import backbone, load_tokenizer
from ..quantize import quantized_weights_bytes
from ..tasks import check_architecture
from .config import AUTO_LR, TrainConfig
from .distributed import Dist, world_size
from .recipe import check_out, passes_for
from .run_dir import RunDir
from .schedule import examples_per_step, make_optimizer, step_indices, total_steps
from .setup import (
    factor_request,
    label_map,
    load_base,
    make_trainable,
    pack_training,
    resolve,
    scaling,
    split_rows,
)


def plan_training(config: TrainConfig, measure: bool = True) -> dict:
    """What `train` would do: cache hit or miss, sizes, steps, the learning rates it would use; with
    `measure`, also the time per step, timed on one real batch (`measure_step`: loads the weights)."""
    config.validate()
    config, rows, inferred = resolve(config)
    check_out(config)
    start = RunDir(config.out).plan(config)  # the same decision, and the same refusals, as the real run
    labels = label_map(config, rows)
    train_rows, held_rows = split_rows(config, rows)  # the run's own split (sklearn rounds up)
    request, _, _ = factor_request(config)
    plan = plan_factors(request)
    check_architecture(config.task, plan.base.config, config.model)
    world = world_size()
    sharded = config.distributed == "fsdp" and world > 1
    hidden = getattr(plan.base.config, "hidden_size", 0)
    head = 0 if config.task in datamod.LM_TASKS else hidden * len(labels or [0]) + len(labels or [0])
    item = torch.empty((), dtype=plan.base.weights_dtype).element_size()
    packed = packed_rows(config, plan, labels, train_rows) if config.packing else None
    summary = {
        "model": plan.base.resolved.spec,
        "out": config.out,
        "method": config.method,
        "rank": config.rank,
        "modules": len(plan.targets),
        "cache": f"hit ({plan.entry.id})" if plan.entry else "miss: init runs first",
        "adapter_params": config.rank * config.rank * len(plan.targets),
        "head_params": head,
        "train_examples": None if config.streaming else len(train_rows),  # a stream has no length
        "streaming": config.streaming,
        "eval_examples": len(held_rows),
        "steps": total_steps(config, len(train_rows) if packed is None else len(packed), world),
        "examples_per_step": examples_per_step(config, world),
        "packing": config.packing,  # then a step takes examples_per_step packed rows
        "packed_rows": None if packed is None else len(packed),
        "group_by_length": config.group_by_length,
        "weights_bytes": quantized_weights_bytes(plan.base, config.quantize, item),
        "quantize": config.quantize,
        "distributed": config.distributed,
        "processes": world,
        # --distributed fsdp: each process holds 1/N of the base (plus one block gathered at a time)
        "weights_bytes_per_process": math.ceil(
            quantized_weights_bytes(plan.base, config.quantize, item) / (world if sharded else 1)
        ),
        "task": config.task,
        "task_inferred": bool(inferred),
        "start": start.action,
        "resume": start.describe(),
        "replaces": [str(p.relative_to(config.out)) for p in start.replaces],
        "lr": config.lr,
        "head_lr": config.head_lr if config.task not in datamod.LM_TASKS else None,
        "warmup_ratio": config.warmup_ratio,
    }
    if measure and sharded:
        # Timing a step here would load the whole base into every process: what fsdp is there to avoid.
        summary["not_measured"] = "--distributed fsdp: the base is not loaded whole to time a step"
    elif measure:
        remaining = summary["steps"] - (start.found[1]["step"] if start.found else 0)
        extra_steps = config.lr_find_steps if config.lr == AUTO_LR and not start.found else 0
        summary.update(measure_step(config, plan, rows, labels, remaining + extra_steps, packed))
    return summary


def packed_rows(config: TrainConfig, plan, labels: list[str] | None, rows: list) -> list:
    """--packing: the training rows encoded and packed as the run packs them (its steps count rows)."""
    tokenizer = load_tokenizer(plan.base.resolved)
    examples = datamod.encode(
        rows, tokenizer, config.task, max_length=config.max_length, labels=labels, chat_loss=config.chat_loss
    )
    return pack_training(config, tokenizer, examples)[0]


def measure_step(
    config: TrainConfig, plan, rows: list, labels: list[str] | None, steps: int, packed: list | None = None
) -> dict:
    """Time one optimizer step of the run's shape on real rows: the base with frozen factors of the planned
    shapes but random values (the time does not depend on them, and the factor cache is neither read
    nor written), one real micro-batch of --batch-size examples drawn as step 1 would draw them, the
    second of two steps timed (the first pays for allocation and warm-up), times --grad-accum.
    `steps` optimizer steps of that time give the estimate (evaluation passes are not included).
    `packed` (--packing): the run's packed rows, which the batch is drawn from instead."""
    device = parse_device(config.device)
    tokenizer = load_tokenizer(plan.base.resolved)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
    sample = [rows[i] for i in order[: 4 * config.batch_size]]
    examples = packed or datamod.encode(
        sample, tokenizer, config.task, max_length=config.max_length, labels=labels,
        chat_loss=config.chat_loss,
    )  # fmt: skip
    if not examples:
        raise BadInputError(f"{config.data}: no usable training examples")
    batch = [examples[i] for i in step_indices(0, len(examples), config.batch_size, config.seed)]
    model = load_base(config, plan, tokenizer, labels, device)
    core = backbone(model)
    modules = dict(core.named_modules())
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for name in plan.targets:
        m, n = weight_shape(modules[name])  # the declared sizes: a quantized weight may be packed
        dtype = compute_dtype(modules[name])
        A = torch.randn(config.rank, n, generator=generator) / math.sqrt(n)
        B = torch.randn(m, config.rank, generator=generator) / math.sqrt(config.rank)
        factors[name] = (A.to(device, dtype), B.to(device, dtype))
    inject(core, factors, scaling=scaling(config), init_std=config.init_std, seed=config.seed)
    head_names = make_trainable(model, config)
    model.train()
    timing = replace(config, lr=1e-3 if config.lr == AUTO_LR else config.lr, grad_accum=1)
    optimizer = make_optimizer(model, timing, head_names)
    passes = replace(passes_for(timing, Dist(), device, tokenizer), scaler=None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    rng = rng_state()  # dropout draws from the global generator: leave it as it was
    seconds = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        passes.forward_backward(model, batch)
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
