"""Linear-layer primitives every room shares: what a target layer is, its W, and the update s B R A.

The math treats every target as W of shape (out, in), y = W x. An nn.Linear stores exactly that;
GPT-2's Conv1D stores W^T (in, out). `weight_matrix` hides the difference (a view, no copy), and
`merge_delta` adds an update to a stored weight in whichever layout it has.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["delta_weight", "is_conv1d", "is_linear", "merge_delta", "weight_matrix", "weight_shape"]


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
    """(out_features, in_features) of a Linear or Conv1D."""
    m, n = weight_matrix(module).shape
    return int(m), int(n)


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
