"""LoRA-SB factors: the truncated SVD of an approximated first full-fine-tuning step.

On a small sample of the training data we average the gradient G of the loss with respect to every
target weight W (float32). The first AdamW step from a fresh optimizer is

    dW = -eta * G / (|G| + eps)   (- eta * weight_decay * W, optionally)

since Adam's bias-corrected moments after one step are m = G and v = G^2. Its truncated SVD
dW ~ P S Q^T gives B = P, A = Q^T (both orthonormal) and R0 = diag(S), scaling 1, so training starts
at W + rank_r(dW) while W itself is unchanged.

Memory: gradients of the targets are folded into float32 accumulators by post-accumulate hooks and
freed at once, so no target ever holds a `.grad`; when all accumulators would exceed the budget,
targets are processed in groups, with one pass over the sample per group. On a base sharded with FSDP2
(`train --distributed fsdp`) the accumulators are shards of the weights' own layout, FSDP reduces each
backward's gradient across the processes itself, and each weight's mean gradient is gathered whole
only for its SVD, one weight at a time.

The official LoRA-SB code (utils/gradient_utils.py, estimate_and_process_grads_torch) differs in three
ways that each have a recorded setting here: it runs the pass in train mode (dropout on), sums the
gradients in the weights' dtype (bfloat16 for its LLMs), and takes the sign step -eta * sign(G).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BadInputError, DivergedError
from .factors import SVDSettings, truncated_svd
from .method_defaults import SB_DEFAULTS
from .models import is_conv1d, weight_matrix

# eta of the approximated step and AdamW's eps: the defaults live in method_defaults.SB_DEFAULTS.
DEFAULT_ETA = SB_DEFAULTS.eta
DEFAULT_EPS = SB_DEFAULTS.eps


STEPS = ("adam", "sign")
GRAD_MODES = ("eval", "train")
ACCUM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ACCUM_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_accum_dtype(name: str) -> str:
    """'float32' | 'fp32' | 'bfloat16' | 'bf16' -> the canonical name recorded in the recipe."""
    canonical = _ACCUM_ALIASES.get(name.lower(), name.lower())
    if canonical not in ACCUM_DTYPES:
        raise BadInputError(f"unknown --sb-accum-dtype {name!r}: use float32 or bfloat16")
    return canonical


@dataclass(frozen=True)
class SBSettings:
    """The recorded settings of the approximated first step (part of the cache recipe)."""

    eta: float = DEFAULT_ETA
    eps: float = DEFAULT_EPS
    weight_decay: float = 0.0
    step: str = SB_DEFAULTS.step  # adam: -eta G / (|G| + eps); sign: -eta sign(G), the official code's

    def __post_init__(self):
        if self.step not in STEPS:
            raise BadInputError(f"unknown --sb-step {self.step!r}: use {' or '.join(STEPS)}")

    def as_dict(self) -> dict:
        # The step is recorded only when it is not the default, so existing cache entries stay valid.
        extra = {} if self.step == SB_DEFAULTS.step else {"step": self.step}
        return {"eta": self.eta, "eps": self.eps, "weight_decay": self.weight_decay, **extra}


def plan_groups(
    shapes: dict[str, tuple[int, int]], budget_bytes: int, element_bytes: int = 4
) -> list[list[str]]:
    """Split the targets (in model order) into groups whose accumulators fit the budget."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, (m, n) in shapes.items():
        size = m * n * element_bytes
        if current and used + size > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def average_gradients(
    model: nn.Module,
    backbone: nn.Module,
    names: Sequence[str],
    batches: Callable[[], Iterable[dict]],
    *,
    budget_bytes: int,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    mode: str = "eval",
    accum_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    passes: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields, group by group, the mean gradient of the loss w.r.t. each target weight (float32, (out, in)).

    Consume each group before asking for the next: only one group's accumulators exist at a time.
    `batches()` yields model inputs (with labels) and is called once per group, so its order must
    be deterministic. `all_reduce` sums a tensor across processes (torch.distributed), so every rank
    gets identical averages.

    `mode="eval"` (default) runs the pass with dropout off; `"train"` with dropout on, as the official
    code does. In train mode every group's pass starts from the same seeded RNG state (the global RNG
    is restored afterwards), so every pass draws the same dropout masks and grouping changes nothing.
    `accum_dtype` is the dtype of the running sums (bfloat16: the official code's, on a bf16 model).

    Target weights sharded by FSDP2 (DTensors): the yielded gradients are DTensors of the same sharding
    (`sb_factors` gathers them one at a time), FSDP averages each backward's gradient across processes,
    and `all_reduce` sums only the batch count. Every process must then run the same number of passes:
    `passes`; one whose batches run out repeats its last batch with a zero loss weight, uncounted.
    """
    if mode not in GRAD_MODES:
        raise BadInputError(f"unknown --sb-grad-mode {mode!r}: use {' or '.join(GRAD_MODES)}")
    modules = dict(backbone.named_modules())
    shapes = {n: tuple(weight_matrix(modules[n]).shape) for n in names}
    element_bytes = torch.empty((), dtype=accum_dtype).element_size()
    groups = plan_groups(shapes, budget_bytes, element_bytes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    # Eval mode by default: every group's pass sees the same function and the factors are
    # reproducible (they are cached by recipe).
    was_training = model.training
    model.train(mode == "train")
    try:
        for group_index, group in enumerate(groups):
            with _seeded_rng(model, seed, enabled=mode == "train"):
                if _is_sharded(modules[group[0]].weight):
                    group_gradients = _sharded_group_gradients(
                        model, modules, group, batches, all_reduce, on_batch, group_index, accum_dtype, passes
                    )
                else:
                    group_gradients = _group_gradients(
                        model, modules, group, batches, all_reduce, on_batch, group_index, accum_dtype
                    )
            yield group_gradients
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def _seeded_rng(model: nn.Module, seed: int, *, enabled: bool):
    """The same RNG stream (dropout masks) for every pass, without disturbing the caller's RNG."""
    if not enabled:
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for index in devices:  # only the devices the model is on; others are left alone
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _group_gradients(model, modules, group, batches, all_reduce, on_batch, group_index, accum_dtype):
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name in group:
        weight = modules[name].weight
        sums[name] = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device)

        def fold(param: torch.Tensor, name=name) -> None:
            sums[name].add_(param.grad.to(accum_dtype))
            param.grad = None  # freed at once: at most this one gradient exists beside the sums

        weight.requires_grad_(True)
        handles.append(weight.register_post_accumulate_grad_hook(fold))
    count = torch.zeros((), dtype=torch.float64)
    try:
        for batch in batches():
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise DivergedError("LoRA-SB init: the loss on the sample is not finite; check the data")
            loss.backward()
            count += 1
            if on_batch:
                on_batch(group_index, int(count))
    finally:
        for handle in handles:
            handle.remove()
        for name in group:
            modules[name].weight.requires_grad_(False)
            modules[name].weight.grad = None
    if all_reduce is not None:
        for tensor in sums.values():
            all_reduce(tensor)
        count_tensor = count.to(next(iter(sums.values())).device)
        all_reduce(count_tensor)
        count = count_tensor.cpu()
    if count == 0:
        raise BadInputError("LoRA-SB init: the gradient sample is empty")
    out = {}
    for name in group:
        gradient = sums.pop(name).float().div_(float(count))
        # Conv1D stores W^T: bring the gradient to the (out, in) convention of the math.
        out[name] = gradient.t().contiguous() if is_conv1d(modules[name]) else gradient
    return out


def _is_sharded(tensor: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor). torch.distributed.tensor is not imported here (a second of start-up
    for every run): while nothing has loaded it, no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _sharded_group_gradients(
    model, modules, group, batches, all_reduce, on_batch, group_index, accum_dtype, passes
):
    """`_group_gradients` for weights sharded by FSDP2. FSDP reduce-scatters each backward's gradient
    (the mean over processes) into the sharded `.grad`, which is folded into a sharded accumulator after
    the backward (post-accumulate hooks do not fire on FSDP's sharded parameters) and freed; the sum
    over passes is then `world / count` times the mean over all processes' batches."""
    sums = {name: torch.zeros_like(modules[name].weight, dtype=accum_dtype) for name in group}
    for name in group:
        modules[name].weight.requires_grad_(True)
    count, runs, last = 0, 0, None

    def backward(batch: dict, weight: float) -> None:
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise DivergedError("LoRA-SB init: the loss on the sample is not finite; check the data")
        (loss if weight == 1.0 else loss * weight).backward()
        for name in group:
            param = modules[name].weight
            if param.grad is not None:
                sums[name].add_(param.grad.to(accum_dtype))
                param.grad = None

    try:
        for batch in batches():
            backward(batch, 1.0)
            count, runs, last = count + 1, runs + 1, batch
            if on_batch:
                on_batch(group_index, count)
        while last is not None and passes is not None and runs < passes:
            backward(last, 0.0)  # the others are still in their passes: take part, add nothing
            runs += 1
    finally:
        for name in group:
            modules[name].weight.requires_grad_(False)
            modules[name].weight.grad = None
    total = torch.tensor(float(count), dtype=torch.float64, device=next(iter(sums.values())).device)
    if all_reduce is not None:
        all_reduce(total)
    if total.item() == 0:
        raise BadInputError("LoRA-SB init: the gradient sample is empty")
    out = {}
    for name in group:
        world = sums[name].device_mesh.size()
        gradient = sums.pop(name).float().mul_(world / total.item())
        out[name] = gradient.t().contiguous() if is_conv1d(modules[name]) else gradient
    return out


def first_adamw_step(
    gradient: torch.Tensor, weight: torch.Tensor | None, settings: SBSettings
) -> torch.Tensor:
    """dW of one AdamW step from a fresh optimizer (bias-corrected moments: m = G, v = G^2).

    `settings.step == "sign"` takes the official code's -eta * sign(G) (its eps -> 0 limit).
    """
    if settings.step == "sign":
        step = -settings.eta * torch.sign(gradient)
    else:
        step = -settings.eta * gradient / (gradient.abs() + settings.eps)
    if settings.weight_decay and weight is not None:
        step = step - settings.eta * settings.weight_decay * weight.float()
    return step


def sb_factors(
    gradient_groups: Iterable[dict[str, torch.Tensor]],
    backbone: nn.Module,
    rank: int,
    settings: SBSettings,
    svd: SVDSettings,
    on_module: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """B = P, A = Q^T, S (R0 = diag(S)) from the truncated SVD of each dW, and per-module stats."""
    modules = dict(backbone.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for group in gradient_groups:
        for name in list(group):
            gradient = group.pop(name)
            if _is_sharded(gradient):  # FSDP2: this one weight's gradient, gathered whole for its SVD
                gradient = gradient.full_tensor()
            weight = weight_matrix(modules[name]).detach()
            if settings.weight_decay and _is_sharded(weight):
                weight = weight.full_tensor()
            delta = first_adamw_step(gradient, weight if settings.weight_decay else None, settings)
            del gradient
            _store(tensors, stats, name, delta, rank, svd)
            if on_module:
                on_module(name)
    return tensors, stats


def _store(tensors: dict, stats: dict, name: str, delta: torch.Tensor, rank: int, svd: SVDSettings) -> None:
    u, s, vh = truncated_svd(delta, rank, svd, name)
    tensors[f"{name}.B"] = u.contiguous().cpu()
    tensors[f"{name}.A"] = vh.contiguous().cpu()
    tensors[f"{name}.S"] = s.contiguous().cpu()
    stats[name] = {
        "shape": list(delta.shape),
        "frobenius_sq": float(delta.square().sum()),
        "singular_values": [float(v) for v in s.tolist()],
    }
