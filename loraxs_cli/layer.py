"""The LoRA-XS layer, and injecting it into (and removing it from) a model.

    y = base(x) + s * B R A x        A: (r, n) frozen, B: (m, r) frozen, R: (r, r) trained

The adapter path is a custom autograd Function so that its backward keeps only
`z = A x` (tokens x r) from the forward, never the layer input x (tokens x n). R, its
gradient and hence its optimizer state stay float32 whatever the model dtype.

Fused path (the default for a plain nn.Linear): W, A and B live in one block matrix
`[[W, B], [A, 0]]` (the base weight and the factors become views of it: no copy is kept), so the
forward is one GEMM giving `W x` and `A x` together with the update `u B^T` added in place, and the
backward one GEMM giving `g W` and `g B` together with `s (g B) R A` added in place. It serves training
and inference alike. The unfused path (a separate
`base(x)` plus the adapter Function) stays for what cannot be fused: GPT-2's Conv1D, quantized or
sharded (FSDP2 DTensor) weights, subclasses of nn.Linear (bitsandbytes), a base with hooks, autocast to
a dtype other than the weights', and `set_fused(model, False)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import BadInputError, IncompatibleError
from .linear import (
    compute_dtype,
    delta_weight,
    is_conv1d,
    is_linear,
    merge_delta,
    weight_matrix,
    weight_shape,
)

__all__ = ["XSLinear", "adapters_disabled", "inject", "remove", "set_fused", "xs_modules"]


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


class _FusedXSFunction(torch.autograd.Function):
    """y = W x + b + s * ((A x) R^T) B^T, with W, A and B held in one block matrix

        K = [[W, B],      (m + r, n + r): the base weight and the two factors are views of it
             [A, 0]]

    Forward: one GEMM with K[:, :n] = [W; A] gives W x and z = A x together; `u B^T` is added in place
    into the first m columns (a GEMM with beta 1: no (tokens, m) delta is written and read back).
    Backward: one GEMM with K[:m] = [W, B] gives g W and g B together, then the input gradient is
    g W + v A with v = s (g B) R, added in place; grad_R = s (g B)^T z. Saved for backward: z
    (tokens x r, copied out of the fused output so the output is not kept alive) and K, never x. The
    output is a strided view (row stride m + r) of the fused GEMM's result, as in multi.py's inference
    path; a projection's consumers (view, transpose, add) take it as it is.
    """

    @staticmethod
    def forward(ctx, x: Tensor, block: Tensor, bias: Tensor | None, R: Tensor, scaling: float) -> Tensor:
        r = R.shape[0]
        m, n = block.shape[0] - r, block.shape[1] - r
        with _no_autocast(x.device.type):
            out = F.linear(x, block[:, :n], bias)  # (..., m + r) = [W x + b, A x]
            y, z = out[..., :m], out[..., m:].contiguous()
            acc = torch.promote_types(x.dtype, R.dtype)
            u = (F.linear(z.to(acc), R.to(acc)) * scaling).to(x.dtype)
            y.view(-1, m).addmm_(u.view(-1, r), block[:m, n:].t())  # y += u B^T
        ctx.scaling = scaling
        ctx.save_for_backward(z, block, R)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        z, block, R = ctx.saved_tensors
        s = ctx.scaling
        r = R.shape[0]
        m, n = block.shape[0] - r, block.shape[1] - r
        need_x, _, _, need_r, _ = ctx.needs_input_grad
        grad_x = grad_r = None
        with _no_autocast(g.device.type):
            acc = torch.promote_types(z.dtype, R.dtype)
            g2 = g.to(z.dtype).reshape(-1, m)
            if need_x:
                both = g2 @ block[:m]  # (tokens, n + r) = [g W, g B]: one GEMM
                grad_x, gB = both[:, :n], both[:, n:]
            else:
                gB = g2 @ block[:m, n:]
            if need_r:
                grad_r = ((gB.to(acc).t() @ z.reshape(-1, r).to(acc)) * s).to(R.dtype)
            if need_x:
                v = ((gB.to(acc) @ R.to(acc)) * s).to(z.dtype)
                grad_x = grad_x.addmm_(v, block[m:, :n]).view(*g.shape[:-1], n)  # g W + v A
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
        fuse: bool = True,
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
        # The compute dtype, not a quantized weight's int8 / packed uint8 (linear.compute_dtype).
        like = {"device": w.device, "dtype": compute_dtype(base)}
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
        # False: the layer computes base(x) alone, the base model exactly (`adapters_disabled`: the
        # reference model of preference tuning, without a second copy of the base in memory).
        self.enabled = True
        # The block [[W, B], [A, 0]] when fused (a plain attribute, not a buffer: the base weight, A and
        # B are its views, and a model.to() that moves them apart is noticed and the block rebuilt on
        # the next forward).
        self.fuse = bool(fuse)
        self._fused: Tensor | None = None
        self._fused_bias: Tensor | None = None
        if self.fuse and self.fusable():
            self._build_fused()

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

    # ------------------------------------------------------------------ the fused path

    def fusable(self) -> bool:
        """Whether this layer can run fused: a plain nn.Linear (not a subclass such as bitsandbytes'),
        a dense floating weight (not a quantized tensor subclass or an FSDP2 DTensor), no hooks."""
        base = self.base
        weight = base.weight
        return (
            type(base) is nn.Linear
            and type(weight.data) is torch.Tensor
            and weight.dtype.is_floating_point
            and weight.device.type != "meta"
            and not (base._forward_hooks or base._forward_pre_hooks)
        )

    @property
    def fused(self) -> bool:
        """True while the base weight, A and B are views of one block matrix."""
        k = self._fused
        if k is None:
            return False
        m, n = self.out_features, self.in_features
        return (
            self.base.weight.data_ptr() == k.data_ptr()
            and self.A.data_ptr() == k[m:, :n].data_ptr()
            and self.B.data_ptr() == k[:m, n:].data_ptr()
            and self.base.weight.dtype == k.dtype
        )

    def _build_fused(self) -> None:
        w, m, n, r = self.base.weight, self.out_features, self.in_features, self.rank
        with torch.no_grad():
            block = w.new_zeros((m + r, n + r))
            block[:m, :n] = w
            block[:m, n:] = self.B
            block[m:, :n] = self.A
            w.data = block[:m, :n]
            self.A, self.B = block[m:, :n], block[:m, n:]
            bias = self.base.bias
            self._fused_bias = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(r)])
        self._fused = block

    def unfuse(self) -> None:
        """Give the base weight, A and B their own (contiguous) storage again (remove() does it)."""
        if self.fused:
            self.base.weight.data = self.base.weight.data.contiguous().clone()
            self.A, self.B = self.A.contiguous().clone(), self.B.contiguous().clone()
        self._fused = self._fused_bias = None

    def _use_fused(self, x: Tensor) -> bool:
        if not self.fuse:
            return False
        if not self.fused:
            if not self.fusable():
                return False
            self._build_fused()  # first use after a model.to() / .half() moved the views apart
        dtype = self._fused.dtype
        if torch.is_autocast_enabled(x.device.type):
            # Autocast would run the base GEMM in its dtype: fuse only when that is the weights' own.
            return torch.get_autocast_dtype(x.device.type) == dtype
        return x.dtype == dtype and x.device == self._fused.device

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        if self._use_fused(x):
            return _FusedXSFunction.apply(
                x.to(self._fused.dtype), self._fused, self._fused_bias, self.R, self.scaling
            )
        y = self.base(x)
        # Follow the base output's dtype (it differs from x and A under autocast).
        dt = y.dtype
        delta = _XSFunction.apply(x.to(dt), self.A.to(dt), self.B.to(dt), self.R, self.scaling)
        return y + delta

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, fused={self.fused}"
        )


def _check_factor_shapes(name: str, base: nn.Module, A: Tensor, B: Tensor, R: Tensor | None) -> None:
    """Shapes must match the layer; a mismatch means factors computed for another model."""
    m, n = weight_shape(base)  # the declared sizes: a quantized weight may be packed
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


def remove(model: nn.Module, *, merge: bool = False) -> dict[str, Tensor]:
    """Put the original base modules back; return name -> R (detached float32 clone).

    `merge`: fold each update into its base weight first, W' = W + s B R A (linear.merge_delta: float32,
    cast back to W's dtype), so the model computes what it did with the adapter. Parameters stay frozen
    (inject froze them): unfreezing is the caller's decision.
    """
    found = xs_modules(model)
    if merge:
        quantized = [name for name, xs in found.items() if not xs.base.weight.dtype.is_floating_point]
        if quantized:
            raise BadInputError(f"cannot merge into {quantized[0]}: its weight is quantized")
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for name, xs in found.items():
        xs.unfuse()
        if merge:
            with torch.no_grad():
                weight = xs.base.weight
                weight.data = merge_delta(weight, xs.A, xs.B, xs.R, xs.scaling, transposed=is_conv1d(xs.base))
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, xs.base)
        out[name] = xs.R.detach().float().clone()
    return out


def set_fused(model: nn.Module, fuse: bool) -> None:
    """Switch the fused path on or off in every LoRA-XS layer of `model` (off: the base weight, A and B
    get their own storage back). train/fsdp.py switches it off: FSDP2 owns the weights' storage."""
    for xs in xs_modules(model).values():
        xs.fuse = bool(fuse)
        if not fuse:
            xs.unfuse()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Every LoRA-XS layer of `model` (wrapped by DDP or not) computes its base layer alone inside the
    block, so the model is its base model; each layer's own setting is restored after."""
    layers = list(xs_modules(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled


def xs_modules(model: nn.Module) -> dict[str, XSLinear]:
    """name -> XSLinear currently injected in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, XSLinear)}
