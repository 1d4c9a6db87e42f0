"""The LoRA-XS layer, and injecting it into (and removing it from) a model.

    y = base(x) + s * B R A x        A: (r, n) frozen, B: (m, r) frozen, R: (r, r) trained

The adapter path is a custom autograd Function so that its backward keeps only
`z = A x` (tokens x r) from the forward, never the layer input x (tokens x n). R, its
gradient and hence its optimizer state stay float32 whatever the model dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import BadInputError, IncompatibleError
from .linear import delta_weight, is_linear, weight_matrix

__all__ = ["XSLinear", "inject", "remove", "xs_modules"]


def _no_autocast(device_type: str):
    """Autocast would silently run the float32 R product in bf16/fp16: switch it off locally."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        enabled = False
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


class _XSFunction(torch.autograd.Function):
    """out = s * ((x A^T) R^T) B^T, saving only z = x A^T (plus A, B, R, which are not activations).

    x, A, B come in the compute dtype; R is float32 (or wider). The r x r product runs in
    promote(compute dtype, R dtype), so never below float32, and grad_R is accumulated there.
    """

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, R: Tensor, scaling: float) -> Tensor:
        with _no_autocast(x.device.type):
            acc = torch.promote_types(x.dtype, R.dtype)
            z = F.linear(x, A)  # (..., r)
            u = (F.linear(z.to(acc), R.to(acc)) * scaling).to(x.dtype)
            out = F.linear(u, B)  # (..., m)
        ctx.scaling = scaling
        ctx.save_for_backward(z, A, B, R)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        z, A, B, R = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_r, _ = ctx.needs_input_grad
        grad_x = grad_r = None
        with _no_autocast(g.device.type):
            acc = torch.promote_types(z.dtype, R.dtype)
            gB = g.to(z.dtype) @ B  # (..., r)
            if need_r:
                r = R.shape[0]
                grad_r = (gB.reshape(-1, r).to(acc).t() @ z.reshape(-1, r).to(acc)) * s
                grad_r = grad_r.to(R.dtype)
            if need_x:
                grad_x = ((gB.to(acc) @ R.to(acc)) * s).to(z.dtype) @ A  # (..., n)
        return grad_x, None, None, grad_r, None


class XSLinear(nn.Module):
    """Wraps a frozen target layer: y = base(x) + scaling * B @ R @ A @ x.

    `base` is an nn.Linear or a GPT-2 Conv1D; A and B follow the math convention
    (W is (out, in)) for both. A and B are non-persistent buffers in the base weight's dtype
    (they belong to the factor set, not the adapter); R is a float32 Parameter.
    """

    def __init__(
        self,
        base: nn.Module,
        A: Tensor,
        B: Tensor,
        scaling: float,
        R: Tensor | None = None,
        init_std: float = 1e-5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not is_linear(base):
            raise BadInputError(
                f"cannot wrap a {type(base).__name__}: LoRA-XS targets nn.Linear or GPT-2 Conv1D layers"
            )
        _check_factor_shapes(type(base).__name__, base, A, B, R)
        w = weight_matrix(base)
        self.base = base
        base.requires_grad_(False)
        self.scaling = float(scaling)
        like = {"device": w.device, "dtype": w.dtype}
        self.register_buffer("A", A.detach().to(**like).contiguous(), persistent=False)
        self.register_buffer("B", B.detach().to(**like).contiguous(), persistent=False)
        r = A.shape[0]
        if R is None:
            # Local generator (CPU) so that adapter init never touches or depends on the global RNG.
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            r0 = torch.randn((r, r), generator=gen, dtype=torch.float32, device=gen.device) * init_std
        else:
            r0 = R.detach().to(torch.float32).clone()
        self.R = nn.Parameter(r0.to(w.device))

    @property
    def rank(self) -> int:
        return self.R.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def base_weight_matrix(self) -> Tensor:
        """The base weight as the (m, n) W of the math (a transposed view for Conv1D)."""
        return weight_matrix(self.base)

    def delta_weight(self) -> Tensor:
        """s * B R A as float32 (m, n): what a merge adds to W."""
        return delta_weight(self.A, self.B, self.R, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        # Follow the base output's dtype (it differs from x and A under autocast).
        dt = y.dtype
        delta = _XSFunction.apply(x.to(dt), self.A.to(dt), self.B.to(dt), self.R, self.scaling)
        return y + delta

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}"
        )


def _check_factor_shapes(name: str, base: nn.Module, A: Tensor, B: Tensor, R: Tensor | None) -> None:
    """Shapes must match the layer; a mismatch means factors computed for another model."""
    m, n = weight_matrix(base).shape
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n or B.shape[0] != m or B.shape[1] != A.shape[0]:
        raise IncompatibleError(
            f"factors for {name} do not fit its ({m}, {n}) weight: A is {tuple(A.shape)}, "
            f"B is {tuple(B.shape)} (expected A (r, {n}) and B ({m}, r)); recompute them for this base"
        )
    r = A.shape[0]
    if R is not None and tuple(R.shape) != (r, r):
        raise IncompatibleError(f"initial R for {name} is {tuple(R.shape)}, expected ({r}, {r})")


def _resolve_targets(model: nn.Module, names) -> dict[str, nn.Module]:
    """Look up every name first, so a bad one fails before the model is touched."""
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name == "":
            raise BadInputError("the empty module name is the model itself; name its Linear layers")
        mod = modules.get(name)
        if mod is None:
            raise BadInputError(
                f"module {name!r} is not in the model; list names with model.named_modules() "
                "or check the factor set was made for this architecture"
            )
        parent = modules[name.rpartition(".")[0]]
        if isinstance(mod, XSLinear) or isinstance(parent, XSLinear):
            raise BadInputError(f"module {name!r} already has a LoRA-XS adapter; remove() it first")
        if not is_linear(mod):
            raise BadInputError(
                f"module {name!r} is a {type(mod).__name__}, not nn.Linear or Conv1D; "
                "only linear layers can take a LoRA-XS adapter"
            )
        found[name] = mod
    return found


def inject(
    model: nn.Module,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    scaling: float,
    *,
    R: Mapping[str, Tensor] | None = None,
    init_std: float = 1e-5,
    seed: int = 0,
) -> dict[str, XSLinear]:
    """Replace each named module by an XSLinear around it; freeze everything but the R's.

    R's are drawn from one local generator seeded with `seed`, in sorted name order, so
    the same seed and targets give the same R's. A name given in `R` takes that initial
    value instead and draws nothing. All names and shapes are checked before the model changes.
    """
    names = sorted(factors)
    R = dict(R or {})
    extra = sorted(set(R) - set(factors))
    if extra:
        raise BadInputError(f"initial R given for {extra[0]!r}, which has no factors")
    targets = _resolve_targets(model, names)
    for name in names:
        A, B = factors[name]
        _check_factor_shapes(name, targets[name], A, B, R.get(name))

    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    injected: dict[str, XSLinear] = {}
    for name in names:
        A, B = factors[name]
        xs = XSLinear(targets[name], A, B, scaling, R=R.get(name), init_std=init_std, generator=gen)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, xs)
        injected[name] = xs
    return injected


def remove(model: nn.Module) -> dict[str, Tensor]:
    """Put the original base modules back; return name -> R (detached float32 clone).

    Parameters stay frozen (inject froze them): unfreezing is the caller's decision.
    """
    found = xs_modules(model)
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for name, xs in found.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, xs.base)
        out[name] = xs.R.detach().float().clone()
    return out


def xs_modules(model: nn.Module) -> dict[str, XSLinear]:
    """name -> XSLinear currently injected in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, XSLinear)}
