"""Linear-layer primitives every room shares: what a target layer is, its W, and the update s B R A.

The math treats every target as W of shape (out, in), y = W x. An nn.Linear stores exactly that;
GPT-2's Conv1D stores W^T (in, out). `weight_matrix` hides the difference (a view, no copy), and
`merge_delta` adds an update to a stored weight in whichever layout it has.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "compute_dtype",
    "delta_weight",
    "is_conv1d",
    "is_linear",
    "merge_delta",
    "weight_matrix",
    "weight_shape",
]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils), told by its class name and `nf` without importing
    transformers (the layer primitives stay importable alone)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA-XS can wrap: nn.Linear or GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> Tensor:
    """The (out, in) W of the math: a Linear's weight, or the transpose of a Conv1D's (a view)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D, from the sizes the layer declares: a quantized
    layer's weight has another shape (bitsandbytes packs a 4-bit one into (out * in / 2, 1) bytes)."""
    if is_conv1d(module):  # Conv1D(nf, nx): weight (nx, nf)
        return int(module.nf), int(getattr(module, "nx", module.weight.shape[0]))
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    m, n = weight_matrix(module).shape
    return int(m), int(n)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in, which the adapter's A and B take: its weight's when that is floating
    point; for a quantized weight (int8, packed 4-bit) the layer's `compute_dtype` (bitsandbytes'
    Linear4bit; quantize.py sets it on the 8-bit layers), else its bias's, else float32."""
    weight = module.weight
    if weight.dtype.is_floating_point:
        return weight.dtype
    declared = getattr(module, "compute_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32


def delta_weight(A: Tensor, B: Tensor, R: Tensor, scaling: float) -> Tensor:
    """s * B R A as a float32 (out, in) matrix: what a merge adds to W."""
    return scaling * (B.float() @ R.float() @ A.float())


def merge_delta(
    weight: Tensor, A: Tensor, B: Tensor, R: Tensor, scaling: float, *, transposed: bool = False
) -> Tensor:
    """W + s * B R A computed in float32 and cast back to W's dtype; `transposed`: `weight` is stored
    (in, out), as a Conv1D stores it."""
    delta = delta_weight(A, B, R, scaling)
    work = weight.float()
    work += delta.t() if transposed else delta
    return work.to(weight.dtype)
