"""How many steps, which examples in each, the optimizer, the learning-rate schedule and the autocast
of a run. Every process computes the same global order: rank k takes the k-th slice of each micro-batch."""

from __future__ import annotations

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


def step_indices(step: int, examples: int, per_step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): a fresh seeded permutation per epoch."""
    steps_per_epoch = math.ceil(examples / per_step)
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[offset * per_step : (offset + 1) * per_step].tolist()


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
