"""How many steps, which examples in each, the optimizer, the learning-rate schedule and the autocast
of a run. Every process computes the same global order: rank k takes the k-th slice of each micro-batch."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from transformers import get_scheduler

from ..errors import UsageError
from ..layer import xs_modules
from .config import TrainConfig


def examples_per_step(config: TrainConfig, world: int) -> int:
    return config.batch_size * world * config.grad_accum


def total_steps(config: TrainConfig, examples: int, world: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * math.ceil(examples / examples_per_step(config, world))))


def step_indices(
    step: int, examples: int, per_step: int, seed: int, lengths: tuple[int, ...] | None = None, group: int = 1
) -> list[int]:
    """Example indices of optimizer step `step` (0-based): a fresh seeded permutation per epoch; with
    the examples' `lengths` (--group-by-length), that permutation grouped by length (`epoch_order`)."""
    steps_per_epoch = math.ceil(examples / per_step)
    epoch, offset = divmod(step, steps_per_epoch)
    order = epoch_order(examples, seed, epoch, lengths, group)
    return list(order[offset * per_step : (offset + 1) * per_step])


def grouping(config: TrainConfig, examples: list, world: int) -> dict:
    """step_indices' keyword arguments for the run: with --group-by-length, the examples' lengths and the
    micro-batch of all processes (the examples padded together); without it, none."""
    if not config.group_by_length:
        return {}
    return {"lengths": tuple(len(e.input_ids) for e in examples), "group": config.batch_size * world}


@functools.lru_cache(maxsize=4)
def epoch_order(
    examples: int, seed: int, epoch: int, lengths: tuple[int, ...] | None = None, group: int = 1
) -> tuple[int, ...]:
    """The order of the examples in `epoch`: a seeded permutation, or with `lengths` the same permutation
    grouped as transformers' LengthGroupedSampler groups it (get_length_grouped_indices): cut into
    mega-batches of up to 50 batches of `group` examples (the micro-batch of all processes), each
    sorted longest first, the longest batch of all first, so that a batch pads little and an
    out-of-memory error comes at step 1. It depends only on its arguments: a resumed run sees the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if lengths is None:
        return tuple(torch.randperm(examples, generator=generator).tolist())
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return tuple(get_length_grouped_indices(list(lengths), group, generator=generator))


def data_position(step: int, per_step: int, examples: int) -> dict:
    """Where in the data the run stands after `step` optimizer steps (recorded in checkpoints)."""
    steps_per_epoch = math.ceil(examples / per_step)
    epoch, offset = divmod(step, steps_per_epoch)
    return {"epoch": epoch, "example": offset * per_step, "examples_per_step": per_step}


def make_optimizer(model: torch.nn.Module, config: TrainConfig, head_names: list[str]):
    """AdamW over R (group 0, --lr) and the task head (group 1, --head-lr; 0: a frozen head)."""
    adapter_params = [m.R for m in xs_modules(model).values()]
    named = dict(model.named_parameters())
    groups = [{"params": adapter_params, "lr": config.lr, "weight_decay": config.weight_decay}]
    if head_names:
        groups.append(
            {
                "params": [named[n] for n in head_names],
                "lr": config.lr if config.head_lr is None else config.head_lr,
                "weight_decay": config.weight_decay,
            }
        )
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(optimizer, config: TrainConfig, steps: int):
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
