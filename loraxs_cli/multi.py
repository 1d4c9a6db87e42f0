"""Many adapters on one base: each row of a batch may use a different adapter, or none.

Adapters trained on the same factor set share A and B per module and differ only in R, so a
batch with N adapters costs one `A x` and one `B (...)` for the whole batch plus a gathered r x r
product per row:

    h[i] = W x[i] + B (R'[idx[i]] (A x[i]))         R' = s * R, stacked (N + 1, r, r) float32

Row i uses adapter idx[i]; idx -1 selects an all-zero R (the base model). The scaling of each
adapter is folded into its R, so adapters with different alpha mix freely. Adapters of a lower
rank than the group's are zero-padded: B R A with R padded by zeros is the same product.

Fused path (default): the base weight and A live in one (m + r, n) matrix `[W; A]` and one GEMM
gives both `W x` and `A x`, so x is read once. The base layer's weight becomes a view into that
matrix, so the fusion costs no extra memory; `remove()` gives the layer a plain weight back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .adapter import adapter_factors
from .errors import BadInputError, IncompatibleError
from .linear import compute_dtype, is_conv1d, is_linear, weight_shape
from .models import backbone

__all__ = [
    "AdapterRows",
    "MultiAdapters",
    "MultiXSLinear",
    "factor_key",
    "group_by_factors",
    "inject_multi",
    "load_multi",
    "require_one_factor_set",
]


class AdapterRows:
    """The per-row adapter index shared by every multi-adapter layer of one model."""

    def __init__(self) -> None:
        self.index: Tensor | None = None  # (rows,) long on the model's device; None = base only


class MultiXSLinear(nn.Module):
    """A frozen Linear/Conv1D plus N stacked adapters on one factor set, chosen per row."""

    def __init__(
        self, base: nn.Module, A: Tensor, B: Tensor, R: Tensor, rows: AdapterRows, *, fused: bool = True
    ):
        super().__init__()
        if not is_linear(base):
            raise BadInputError(f"cannot wrap a {type(base).__name__}: expected nn.Linear or GPT-2 Conv1D")
        self.conv1d = is_conv1d(base)
        weight = base.weight
        m, n = weight_shape(base)
        r = A.shape[0]
        if tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r) or R.dim() != 3 or R.shape[1:] != (r, r):
            raise IncompatibleError(
                f"factors do not fit a ({m}, {n}) layer: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                f"R {tuple(R.shape)}; recompute the factors for this base"
            )
        # A quantized base (quantize.py: an int8 or packed 4-bit weight) cannot be fused with A, and A
        # and B take its compute dtype, not the weight's.
        fused = fused and weight.dtype.is_floating_point
        self.base, self.rows, self.fused, self.m, self.r = base, rows, fused, m, r
        like = {"device": weight.device, "dtype": compute_dtype(base)}
        self.register_buffer("A", A.detach().to(**like).contiguous(), persistent=False)
        self.register_buffer("B", B.detach().to(**like).contiguous(), persistent=False)
        zero = torch.zeros((1, r, r), dtype=torch.float32, device=weight.device)
        # Index -1 wraps to the last entry: the zero R of "no adapter".
        stacked = torch.cat([R.detach().to(device=weight.device, dtype=torch.float32), zero])
        self.register_buffer("R", stacked.contiguous(), persistent=False)
        self.fused_weight = None
        if fused:
            self._fuse()

    @property
    def num_adapters(self) -> int:
        return self.R.shape[0] - 1

    def _fuse(self) -> None:
        """[W; A] as one matrix; the base weight becomes a view of its first m rows (no copy kept)."""
        w = self.base.weight
        with torch.no_grad():
            if self.conv1d:  # Conv1D stores W^T (n, m): fuse as (n, m + r)
                fused = torch.cat([w.detach(), self.A.t()], dim=1).contiguous()
                w.data = fused[:, : self.m]
            else:
                fused = torch.cat([w.detach(), self.A]).contiguous()
                w.data = fused[: self.m]
        self.fused_weight = fused
        bias = self.base.bias
        self.fused_bias = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(self.r)])

    def unfuse(self) -> None:
        if self.fused_weight is not None:
            self.base.weight.data = self.base.weight.data.clone()
            self.fused_weight = self.fused_bias = None

    def _base_and_z(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(W x + b, A x) from one GEMM over [W; A] (fused) or two (the naive path)."""
        if self.fused_weight is None:
            return self.base(x), F.linear(x, self.A)
        if self.conv1d:
            flat = x.reshape(-1, x.shape[-1])
            out = (
                flat @ self.fused_weight
                if self.fused_bias is None
                else torch.addmm(self.fused_bias, flat, self.fused_weight)
            )
            out = out.view(*x.shape[:-1], -1)
        else:
            out = F.linear(x, self.fused_weight, self.fused_bias)
        return out[..., : self.m], out[..., self.m :]

    def forward(self, x: Tensor) -> Tensor:
        index = self.rows.index
        if index is None:
            return self.base(x)
        if x.shape[0] != index.shape[0]:
            raise BadInputError(
                f"the batch has {x.shape[0]} rows but {index.shape[0]} adapter indices were selected"
            )
        y, z = self._base_and_z(x)
        acc = torch.promote_types(z.dtype, torch.float32)
        zr = z.reshape(z.shape[0], -1, self.r).to(acc)  # (rows, tokens, r)
        u = torch.bmm(zr, self.R[index].transpose(1, 2).to(acc)).to(y.dtype)  # one r x r product per row
        B = self.B.to(y.dtype)
        if self.fused_weight is None:  # the naive reference: a separate delta, then a sum
            return y + F.linear(u.view(*z.shape), B)
        # y += u B^T in place (GEMM with beta = 1) on the first m columns of the fused output: no
        # (rows, m) delta is written and read back, and nothing is copied. The result is a strided
        # view (row stride m + r), which the projections' consumers (view/split/add) accept.
        y.view(-1, self.m).addmm_(u.view(-1, self.r), B.t())
        return y

    def extra_repr(self) -> str:
        return f"out={self.m}, rank={self.r}, adapters={self.num_adapters}, fused={self.fused}"


class RowHead(nn.Module):
    """A task head (nn.Linear) whose weight and bias are chosen per row: each adapter's own head,
    the base model's for rows without one."""

    def __init__(self, base: nn.Linear, weights: Tensor, biases: Tensor | None, rows: AdapterRows):
        super().__init__()
        self.base, self.rows = base, rows
        own_w = base.weight.detach()[None]
        self.register_buffer("W", torch.cat([weights.to(own_w), own_w]), persistent=False)
        own_b = None if base.bias is None else base.bias.detach()[None]
        self.register_buffer(
            "b", None if own_b is None else torch.cat([biases.to(own_b), own_b]), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        index = self.rows.index
        if index is None:
            return self.base(x)
        y = torch.einsum("b...i,boi->b...o", x, self.W[index].to(x.dtype))
        if self.b is not None:
            y = y + self.b[index].to(y.dtype).view(index.shape[0], *([1] * (y.dim() - 2)), -1)
        return y


@dataclass
class MultiAdapters:
    """Stacked adapters injected into a model; `select(index)` sets each row's adapter for a forward."""

    model: nn.Module  # the module the layer names are relative to
    rows: AdapterRows
    layers: dict[str, MultiXSLinear]
    heads: dict[str, RowHead] = field(default_factory=dict)
    head_root: nn.Module | None = None
    names: list[str] = field(default_factory=list)

    def index_tensor(self, index: Sequence[int] | Tensor) -> Tensor:
        device = next(iter(self.layers.values())).R.device if self.layers else torch.device("cpu")
        tensor = torch.as_tensor(index, dtype=torch.long, device=device).view(-1)
        count = len(self.names) if self.names else (next(iter(self.layers.values())).num_adapters)
        if tensor.numel() and (int(tensor.max()) >= count or int(tensor.min()) < -1):
            raise BadInputError(f"adapter index out of range: {count} adapters loaded (-1 = none)")
        return tensor

    @contextlib.contextmanager
    def select(self, index: Sequence[int] | Tensor) -> Iterator[Tensor]:
        """Row i of the next forward passes uses adapter index[i] (-1: no adapter)."""
        previous = self.rows.index
        self.rows.index = self.index_tensor(index)
        try:
            yield self.rows.index
        finally:
            self.rows.index = previous

    def remove(self) -> None:
        """Put the plain base layers (with plain, unfused weights) and heads back."""
        modules = dict(self.model.named_modules())
        for name, layer in self.layers.items():
            layer.unfuse()
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, layer.base)
        if self.head_root is not None:
            head_modules = dict(self.head_root.named_modules())
            for name, head in self.heads.items():
                parent, _, child = name.rpartition(".")
                setattr(head_modules[parent], child, head.base)
        self.layers, self.heads = {}, {}


def inject_multi(
    model: nn.Module,
    factors: dict[str, tuple[Tensor, Tensor]],
    stacks: dict[str, Tensor],
    *,
    fused: bool = True,
) -> MultiAdapters:
    """Wrap each named module of `model` with a MultiXSLinear holding `stacks[name]` (N, r, r),
    already multiplied by each adapter's scaling."""
    modules = dict(model.named_modules())
    missing = sorted(set(factors) - set(modules))
    if missing:
        raise BadInputError(f"module {missing[0]!r} is not in the model; the factors belong to another model")
    rows = AdapterRows()
    layers: dict[str, MultiXSLinear] = {}
    for name in sorted(factors):
        A, B = factors[name]
        layer = MultiXSLinear(modules[name], A, B, stacks[name], rows, fused=fused)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, layer)
        layers[name] = layer
    return MultiAdapters(model, rows, layers)


# ----------------------------------------------------------------------------------------------
# From adapter objects


def factor_key(adapter) -> tuple[str, str, str]:
    """What adapters must share to be stacked: the base weights and the exact factor set."""
    config = adapter.config
    return (
        str(config.base.get("fingerprint")),
        str(config.factors.get("id")),
        str(config.factors.get("sha256")),
    )


def _describe(adapter, name: str) -> str:
    config = adapter.config
    return f"{name} (base {config.base.get('spec')!r}, factor set {config.factors.get('id')})"


def group_by_factors(adapters: Sequence, names: Sequence[str] | None = None) -> list[list[int]]:
    """Indices of adapters grouped by factor set, in first-seen order (one batched pass per group)."""
    groups: dict[tuple, list[int]] = {}
    for i, adapter in enumerate(adapters):
        groups.setdefault(factor_key(adapter), []).append(i)
    return list(groups.values())


def require_one_factor_set(adapters: Sequence, names: Sequence[str]) -> None:
    """Refuse (exit 4) to stack adapters of different bases or factor sets, naming two of them."""
    groups = group_by_factors(adapters)
    if len(groups) > 1:
        a, b = groups[0][0], groups[1][0]
        raise IncompatibleError(
            f"adapters {_describe(adapters[a], names[a])} and {_describe(adapters[b], names[b])} "
            "use different bases or factor sets and cannot share one batch; run them separately"
        )


def load_multi(model: nn.Module, adapters: Sequence, names: Sequence[str], *, cache=None, fused: bool = True):
    """Stack adapters that share one factor set into `model` (a transformers model); heads too.

    Adapters of lower rank are zero-padded to the largest; a module one adapter lacks gets R = 0.
    """
    if not adapters:
        raise BadInputError("no adapters to load")
    require_one_factor_set(adapters, names)
    top = max(range(len(adapters)), key=lambda i: adapters[i].config.rank)
    rank = adapters[top].config.rank
    modules = sorted({m for a in adapters for m in a.config.modules})
    factors = adapter_factors(adapters[top], cache)
    lacking = sorted(set(modules) - set(factors))
    if lacking:
        # Another adapter targets a module the largest-rank one does not: take the shared set whole.
        extra = next(a for a in adapters if lacking[0] in a.config.modules)
        raise IncompatibleError(
            f"adapter {names[adapters.index(extra)]} targets {lacking[0]}, which adapter {names[top]} "
            "lacks; stack adapters with the same targets"
        )
    stacks = {}
    for module in modules:
        stack = torch.zeros((len(adapters), rank, rank), dtype=torch.float32)
        for i, adapter in enumerate(adapters):
            R = adapter.R.get(module)
            if R is not None:
                r = R.shape[0]
                stack[i, :r, :r] = R.float() * adapter.config.scaling
        stacks[module] = stack
    multi = inject_multi(
        backbone(model), {m: (factors[m]["A"], factors[m]["B"]) for m in modules}, stacks, fused=fused
    )
    multi.names = list(names)
    _stack_heads(model, multi, adapters, names)
    return multi


def _stack_heads(model: nn.Module, multi: MultiAdapters, adapters: Sequence, names: Sequence[str]) -> None:
    """Replace each Linear that some adapter's head trains by a per-row RowHead."""
    wanted = sorted({p.rpartition(".")[0] for a in adapters for p in a.head})
    if not wanted:
        return
    modules = dict(model.named_modules())
    for module_name in wanted:
        base = modules.get(module_name)
        if not isinstance(base, nn.Linear):
            raise IncompatibleError(f"adapter head {module_name} is not a linear layer of this model")
        weights, biases = [], []
        for adapter, name in zip(adapters, names, strict=True):
            w = adapter.head.get(f"{module_name}.weight", base.weight.detach())
            if tuple(w.shape) != tuple(base.weight.shape):
                raise IncompatibleError(
                    f"adapter {name} head {module_name}.weight has shape {tuple(w.shape)}, "
                    f"the model {tuple(base.weight.shape)}"
                )
            weights.append(w)
            if base.bias is not None:
                biases.append(adapter.head.get(f"{module_name}.bias", base.bias.detach()))
        head = RowHead(base, torch.stack(weights), torch.stack(biases) if biases else None, multi.rows)
        parent, _, child = module_name.rpartition(".")
        setattr(modules[parent], child, head)
        multi.heads[module_name] = head
    multi.head_root = model
