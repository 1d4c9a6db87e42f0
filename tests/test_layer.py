"""Tests for the LoRA-XS layer: exact gradients, dtypes, saved activations, inject/remove."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from loraxs_cli.errors import BadInputError, IncompatibleError
from loraxs_cli.layer import XSLinear, _XSFunction, inject, remove, set_fused, xs_modules


def svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-XS factors of an (m, n) weight: B = U_r, A = diag(S_r) V_r^T."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return (s[:r, None] * vh[:r]).to(w.dtype), u[:, :r].to(w.dtype)


def make_base(kind: str, n: int, m: int, dtype=torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        base = nn.Linear(n, m, bias=True)
        base.weight.data = torch.randn(m, n, generator=g)
    else:
        base = Conv1D(m, n)  # Conv1D(nf=out, nx=in): weight (in, out)
        base.weight.data = torch.randn(n, m, generator=g)
    base.bias.data = torch.randn(m, generator=g)
    return base.to(dtype)


def rand_r(r: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(r, r, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the Function


def test_gradcheck_function():
    g = torch.Generator().manual_seed(0)
    r, n, m = 3, 5, 4
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(r, n, dtype=torch.float64, generator=g)
    B = torch.randn(m, r, dtype=torch.float64, generator=g)
    R = torch.randn(r, r, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, R: _XSFunction.apply(x, A, B, R, 0.7), (x, R))


# ----------------------------------------------------------------------------- against a reference


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_matches_plain_autograd_float64(kind):
    n, m, r, s = 12, 10, 4, 0.5
    base = make_base(kind, n, m)
    w = base.weight.t() if kind == "conv1d" else base.weight
    A, B = svd_factors(w, r)
    layer = XSLinear(base, A, B, s, R=rand_r(r))
    assert layer.R.dtype == torch.float32
    assert (layer.in_features, layer.out_features, layer.rank) == (n, m, r)
    assert torch.equal(layer.base_weight_matrix(), w)
    assert not any(p.requires_grad for p in base.parameters())

    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x1 = x.clone().requires_grad_(True)
    y = layer(x1)
    go = torch.randn_like(y)
    y.backward(go)

    R_ref = layer.R.detach().clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y_ref = base(x2) + s * x2 @ A.T @ R_ref.double().T @ B.T
    y_ref.backward(go)

    assert y.dtype == torch.float64 and y.shape == (2, 3, m)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert layer.R.grad.dtype == torch.float32
    torch.testing.assert_close(layer.R.grad, R_ref.grad)
    torch.testing.assert_close(
        layer.delta_weight().double(), s * B @ R_ref.detach().double() @ A, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_bases(dtype):
    n, m, r, s = 64, 48, 8, 2.0
    base64 = make_base("linear", n, m)
    A64, B64 = svd_factors(base64.weight, r)
    R0 = rand_r(r) * 0.1
    layer = XSLinear(make_base("linear", n, m, dtype), A64, B64, s, R=R0)
    assert layer.A.dtype == dtype and layer.B.dtype == dtype and layer.R.dtype == torch.float32

    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    xl = x.to(dtype).requires_grad_(True)
    y = layer(xl)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.R.grad.dtype == torch.float32 and xl.grad.dtype == dtype

    # fp64 reference on the same (rounded) inputs
    A, B = layer.A.double(), layer.B.double()
    R_ref = R0.double().requires_grad_(True)
    x_ref = xl.detach().double().requires_grad_(True)
    y_ref = base64(x_ref) + s * x_ref @ A.T @ R_ref.T @ B.T
    y_ref.sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    scale = y_ref.abs().max().item()
    assert (y.double() - y_ref).abs().max().item() <= tol * scale
    gr = layer.R.grad.double()
    assert (gr - R_ref.grad).abs().max().item() <= tol * R_ref.grad.abs().max().item()
    gx = xl.grad.double()
    assert (gx - x_ref.grad).abs().max().item() <= tol * x_ref.grad.abs().max().item()


def test_autocast_cpu_bf16():
    n, m, r = 32, 16, 4
    base = make_base("linear", n, m, torch.float32)
    A, B = svd_factors(base.weight, r)
    layer = XSLinear(base, A, B, 1.0, R=rand_r(r))
    x = torch.randn(2, 5, n, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    assert layer.R.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = base(x) + x @ A.T @ layer.R.T @ B.T
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_no_grad_inference_and_repr():
    base = make_base("linear", 8, 6, torch.float32)
    A, B = svd_factors(base.weight, 2)
    layer = XSLinear(base, A, B, 1.0, init_std=0.0)
    with torch.no_grad():
        x = torch.randn(3, 8)
        torch.testing.assert_close(layer(x), base(x))
    assert "rank=2" in repr(layer) and "scaling=1" in repr(layer)
    assert set(layer.state_dict()) == {"R", "base.weight", "base.bias"}  # A, B are not persisted


def test_shape_mismatch_is_incompatible():
    base = make_base("linear", 8, 6, torch.float32)
    A, B = svd_factors(base.weight, 2)
    with pytest.raises(IncompatibleError):
        XSLinear(base, A.T, B, 1.0)
    with pytest.raises(IncompatibleError):
        XSLinear(base, A, B, 1.0, R=torch.zeros(3, 3))


# ----------------------------------------------------------------------------- saved activations


def _saved_activation_bytes(fn, x: torch.Tensor, module: nn.Module) -> tuple[int, list]:
    """Bytes of tensors autograd keeps for backward, other than the module's params/buffers."""
    own = {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: list[tuple[tuple[int, ...], torch.dtype]] = []
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in own:
            total += t.numel() * t.element_size()
            seen.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total, seen


class NaiveXS(nn.Module):
    """The obvious plain-autograd layer, with R float32 as in the real one."""

    def __init__(self, layer: XSLinear):
        super().__init__()
        self.base, self.s = layer.base, layer.scaling
        self.register_buffer("A", layer.A)
        self.register_buffer("B", layer.B)
        self.R = layer.R

    def forward(self, x):
        z = x @ self.A.T
        return self.base(x) + self.s * ((z.float() @ self.R.T).to(x.dtype) @ self.B.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes(dtype):
    tokens, n, r = 512, 1024, 16
    base = nn.Linear(n, n).to(dtype)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r, n, generator=g)
    B = torch.randn(n, r, generator=g)
    layer = XSLinear(base, A, B, 1.0)
    naive = NaiveXS(layer)
    x = torch.randn(2, tokens // 2, n, dtype=dtype, requires_grad=True)
    elem = x.element_size()

    ours, ours_seen = _saved_activation_bytes(layer, x, layer)
    theirs, _ = _saved_activation_bytes(naive, x, naive)
    assert all(s[-1] != n for s, _ in ours_seen), ours_seen  # nothing of x's size
    assert ours <= tokens * r * elem + 1024
    assert ours <= theirs
    # Dropout on x (as in the official LoRA-XS code) makes the plain path keep an x-sized mask.
    dropout = _saved_activation_bytes(lambda x: naive(nn.functional.dropout(x, 0.1)), x, naive)[0]
    assert ours * 10 <= dropout


# ----------------------------------------------------------------------------- inject / remove


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def model_factors(model, suffixes, r=4):
    out = {}
    for name, mod in model.named_modules():
        if name.split(".")[-1] in suffixes:
            w = mod.weight.t() if isinstance(mod, Conv1D) else mod.weight
            out[name] = svd_factors(w, r)
    return out


@pytest.mark.parametrize(
    "make, suffixes",
    [(tiny_llama, {"q_proj", "v_proj", "down_proj"}), (tiny_gpt2, {"c_attn", "c_proj", "c_fc"})],
)
def test_inject_remove_roundtrip(make, suffixes):
    model = make()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    types_before = {n: type(m) for n, m in model.named_modules()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    factors = model_factors(model, suffixes)
    zeros = {k: torch.zeros(4, 4) for k in factors}
    layers = inject(model, factors, 1.0, R=zeros)
    assert set(layers) == set(factors) == set(xs_modules(model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".R") for n in trainable) and len(trainable) == len(factors)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)

    # gradients reach every R
    with torch.no_grad():
        for xs in layers.values():
            xs.R.normal_(0, 0.1)
    model(ids).logits.float().logsumexp(-1).mean().backward()
    assert all(xs.R.grad is not None and xs.R.grad.abs().sum() > 0 for xs in layers.values())

    rs = remove(model)
    assert set(rs) == set(factors) and all(v.dtype == torch.float32 for v in rs.values())
    assert not xs_modules(model)
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == state_before.keys()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_same_seed_same_r():
    def rs(seed):
        model = tiny_llama()
        layers = inject(model, model_factors(model, {"q_proj", "o_proj"}), 1.0, seed=seed)
        return {k: v.R.detach() for k, v in layers.items()}

    a, b, c = rs(7), rs(7), rs(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert all(0 < v.std() < 1e-4 for v in a.values())  # N(0, 1e-5^2)

    model = tiny_llama()
    factors = model_factors(model, {"q_proj"})
    before = torch.random.get_rng_state()
    inject(model, factors, 1.0)
    assert torch.equal(torch.random.get_rng_state(), before)  # inject never touches the global RNG


def test_bad_names():
    model = tiny_llama()
    factors = model_factors(model, {"q_proj"})
    A, B = next(iter(factors.values()))
    with pytest.raises(BadInputError, match="not in the model"):
        inject(model, {"model.layers.9.self_attn.q_proj": (A, B)}, 1.0)
    with pytest.raises(BadInputError, match=r"not nn\.Linear"):
        inject(model, {"model.embed_tokens": (A, B)}, 1.0)
    with pytest.raises(BadInputError):
        inject(model, factors, 1.0, R={"model.norm": torch.zeros(4, 4)})
    assert not xs_modules(model)  # a bad name leaves the model untouched
    inject(model, factors, 1.0)
    with pytest.raises(BadInputError, match="already has"):
        inject(model, factors, 1.0)


# ----------------------------------------------------------------------------- the fused [W; A] path


def test_gradcheck_fused_function():
    from loraxs_cli.layer import _FusedXSFunction

    g = torch.Generator().manual_seed(0)
    r, n, m = 3, 5, 4
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=g, requires_grad=True)
    block = torch.randn(m + r, n + r, dtype=torch.float64, generator=g)  # [[W, B], [A, 0]]
    block[m:, n:] = 0
    bias = torch.randn(m + r, dtype=torch.float64, generator=g)
    bias[m:] = 0  # the layer pads the base's bias with zeros for the A x rows
    R = torch.randn(r, r, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, R: _FusedXSFunction.apply(x, block, bias, R, 0.7), (x, R))
    # the same function as the plain formula on W, A, B taken from the block
    W, A, B = block[:m, :n], block[m:, :n], block[:m, n:]
    expected = x @ W.T + bias[:m] + 0.7 * x @ A.T @ R.T @ B.T
    torch.testing.assert_close(_FusedXSFunction.apply(x, block, bias, R, 0.7), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_unfused(dtype, bias):
    n, m, r, s = 24, 20, 6, 0.5
    base = make_base("linear", n, m, dtype)
    if not bias:
        base.bias = None
    A, B = svd_factors(base.weight.double(), r)
    fused = XSLinear(base, A, B, s, R=rand_r(r))
    assert fused.fused and "fused=True" in repr(fused)
    # the base weight and A are views of one matrix: no extra copy of W is held
    assert fused.base.weight.data_ptr() == fused._fused.data_ptr()
    plain = XSLinear(make_base("linear", n, m, dtype), A, B, s, R=rand_r(r), fuse=False)
    if not bias:
        plain.base.bias = None
    assert not plain.fused

    x = torch.randn(3, 7, n, generator=torch.Generator().manual_seed(3)).to(dtype)
    go = torch.randn(3, 7, m, generator=torch.Generator().manual_seed(4)).to(dtype)
    outs = []
    for layer in (fused, plain):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(go)
        outs.append((y.detach(), xi.grad, layer.R.grad))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for ours, theirs in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(
            ours.double(), theirs.double(), rtol=tol, atol=tol * theirs.abs().max().item()
        )


def test_fused_follows_model_moves_and_switches_off():
    base = make_base("linear", 16, 12, torch.float32)
    A, B = svd_factors(base.weight, 4)
    layer = XSLinear(base, A, B, 1.0, R=rand_r(4))
    x = torch.randn(5, 16)
    expected = layer(x).detach()
    layer.to(torch.float64)  # moves the weight and A apart: rebuilt on the next forward
    assert not layer.fused
    torch.testing.assert_close(layer(x.double()).float(), expected, rtol=1e-5, atol=1e-5)
    assert layer.fused and layer._fused.dtype == torch.float64
    holder = nn.Sequential(layer)
    set_fused(holder, False)
    assert not layer.fused and layer.base.weight.untyped_storage().nbytes() == 12 * 16 * 8
    torch.testing.assert_close(layer(x.double()).float(), expected, rtol=1e-5, atol=1e-5)
    assert not layer.fused  # stays off


def test_what_is_not_fused():
    conv = make_base("conv1d", 8, 6, torch.float32)
    A, B = svd_factors(conv.weight.t(), 2)
    assert not XSLinear(conv, A, B, 1.0).fused  # Conv1D keeps the unfused path

    class Subclass(nn.Linear):  # a quantized Linear (bitsandbytes) is a subclass of nn.Linear
        pass

    sub = Subclass(8, 6)
    A, B = svd_factors(sub.weight, 2)
    assert not XSLinear(sub, A, B, 1.0).fused
    hooked = nn.Linear(8, 6)
    hooked.register_forward_hook(lambda *args: None)
    assert not XSLinear(hooked, A, B, 1.0).fused
    plain = nn.Linear(8, 6)
    layer = XSLinear(plain, A, B, 1.0)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast to another dtype: the unfused path
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_saves_only_z(dtype):
    tokens, n, r = 512, 1024, 16
    base = nn.Linear(n, n).to(dtype)
    g = torch.Generator().manual_seed(0)
    layer = XSLinear(base, torch.randn(r, n, generator=g), torch.randn(n, r, generator=g), 1.0)
    assert layer.fused
    x = torch.randn(2, tokens // 2, n, dtype=dtype, requires_grad=True)
    saved, seen = _saved_activation_bytes(layer, x, layer)
    assert all(s[-1] != n for s, _ in seen), seen  # nothing of x's or the output's size
    assert saved <= tokens * r * x.element_size() + 1024
