"""Stacked multi-adapter layer: rows with different adapters (or none) give the same outputs as
running each adapter alone, on Llama (nn.Linear) and GPT-2 (Conv1D), fused and naive, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraxs_cli.adapter import apply_adapter, load_adapter
from loraxs_cli.errors import BadInputError, IncompatibleError
from loraxs_cli.layer import remove
from loraxs_cli.models import backbone, load_model, resolve_model
from loraxs_cli.multi import MultiXSLinear, inject_multi, load_multi
from models_for_tests import make_adapter

INDEX = [0, 1, -1, 2, 1, -1]


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama_dir, tmp_path_factory):
    # Embedded factors: the factor cache is per test, these adapters are shared by several.
    root = tmp_path_factory.mktemp("llama-adapters")
    return [
        make_adapter(tiny_llama_dir, root / "a", seed=1, embed_factors=True),
        make_adapter(
            tiny_llama_dir, root / "b", seed=2, alpha=8.0, embed_factors=True
        ),  # another scaling: folded into R
        make_adapter(tiny_llama_dir, root / "c", seed=3, r_std=0.2, embed_factors=True),
    ]


def _inputs(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (rows, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # some right padding
    return {"input_ids": ids, "attention_mask": mask}


def _alone(model, adapter, inputs):
    if adapter is None:
        return model(**inputs).logits
    apply_adapter(model, adapter)
    try:
        return model(**inputs).logits
    finally:
        remove(backbone(model))


def _check_rows_match_alone(model_dir, adapter_dirs, fused: bool, dtype=torch.float32, atol=1e-5):
    model = load_model(resolve_model(str(model_dir)), head="causal-lm", dtype=dtype)
    adapters = [load_adapter(d) for d in adapter_dirs]
    inputs = _inputs(len(INDEX))
    with torch.no_grad():
        expected = [
            _alone(model, adapters[i] if i >= 0 else None, inputs)[row] for row, i in enumerate(INDEX)
        ]
        multi = load_multi(model, adapters, [d.name for d in adapter_dirs], fused=fused)
        with multi.select(INDEX):
            got = model(**inputs).logits
        plain = model(**inputs).logits  # no selection: the base model
        multi.remove()
        after = model(**inputs).logits
    for row, want in enumerate(expected):
        torch.testing.assert_close(got[row].float(), want.float(), atol=atol, rtol=atol)
    # The adapters visibly change the output, so equality above is not vacuous.
    assert (expected[0] - expected[2]).abs().max() > 1e-3
    torch.testing.assert_close(plain[2], expected[2], atol=atol, rtol=atol)
    assert torch.equal(after, _alone(model, None, inputs))
    assert not any(isinstance(m, MultiXSLinear) for m in model.modules())


@pytest.mark.parametrize("fused", [True, False])
def test_llama_rows_match_each_adapter_alone(tiny_llama_dir, llama_adapters, fused):
    _check_rows_match_alone(tiny_llama_dir, llama_adapters, fused)


def test_llama_bf16_rows_match_each_adapter_alone(tiny_llama_dir, llama_adapters):
    _check_rows_match_alone(tiny_llama_dir, llama_adapters, True, dtype=torch.bfloat16, atol=3e-2)


def test_gpt2_conv1d_rows_match_each_adapter_alone(tiny_gpt2_dir, tmp_path):
    dirs = [make_adapter(tiny_gpt2_dir, tmp_path / f"g{s}", seed=s, r_std=0.1) for s in (1, 2, 3)]
    _check_rows_match_alone(tiny_gpt2_dir, dirs, fused=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemm_matches_separate_path(kind, dtype):
    """One GEMM over [W; A] gives the same numbers as base(x) and A x computed apart."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m, n, r, N = 24, 16, 4, 5
    outputs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        base = nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
        base = base.to(dtype)
        holder = nn.Module()
        holder.proj = base
        A, B, R = torch.randn(r, n), torch.randn(m, r), torch.randn(N, r, r) * 0.1
        multi = inject_multi(holder, {"proj": (A, B)}, {"proj": R}, fused=fused)
        x = torch.randn(6, 3, n).to(dtype)
        with multi.select([0, 4, -1, 2, 2, 1]):
            outputs[fused] = holder.proj(x)
        # Reference by hand in float32: W x + b + B R[i] A x per row.
        W = (base.weight.t() if kind == "conv1d" else base.weight).float()
        want = x.float() @ W.t() + base.bias.float()
        for row, i in enumerate([0, 4, -1, 2, 2, 1]):
            if i >= 0:
                want[row] += x[row].float() @ A.t() @ R[i].t() @ B.t()
        tol = 1e-5 if dtype == torch.float32 else 6e-2
        torch.testing.assert_close(outputs[fused].float(), want, atol=tol, rtol=tol)
        multi.remove()
        assert base.weight.is_contiguous() and holder.proj is base
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(outputs[True].float(), outputs[False].float(), atol=tol, rtol=tol)


def test_fused_weight_is_shared_not_copied():
    base = nn.Linear(16, 24)
    holder = nn.Module()
    holder.proj = base
    multi = inject_multi(
        holder, {"proj": (torch.randn(4, 16), torch.randn(24, 4))}, {"proj": torch.zeros(2, 4, 4)}
    )
    layer = multi.layers["proj"]
    assert base.weight.data_ptr() == layer.fused_weight.data_ptr()
    with pytest.raises(BadInputError, match="6 rows but 2 adapter indices"), multi.select([0, 1]):
        holder.proj(torch.randn(6, 16))
    with pytest.raises(BadInputError, match="out of range"), multi.select([2]):
        pass


def test_seq_cls_heads_are_chosen_per_row(tiny_bert_dir, tmp_path):
    dirs = [make_adapter(tiny_bert_dir, tmp_path / f"h{s}", task="seq-cls", seed=s) for s in (1, 2)]
    adapters = [load_adapter(d) for d in dirs]
    model = load_model(resolve_model(str(tiny_bert_dir)), head="seq-cls")
    index = [1, -1, 0]
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(100, 2000, (3, 9), generator=gen)}
    with torch.no_grad():
        base_logits = model(**inputs).logits.clone()
        head = {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("classifier.")}
        expected = []
        for row, i in enumerate(index):
            if i < 0:
                expected.append(base_logits[row])
                continue
            apply_adapter(model, adapters[i])
            expected.append(model(**inputs).logits[row])
            remove(backbone(model))
            for k, v in head.items():  # apply_adapter overwrote the head: restore it
                dict(model.named_parameters())[k].copy_(v)
        multi = load_multi(model, adapters, ["h1", "h2"])
        with multi.select(index):
            got = model(**inputs).logits
    for row, want in enumerate(expected):
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], base_logits[0], atol=1e-3)


def test_different_bases_or_factor_sets_are_refused(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    llama = load_adapter(make_adapter(tiny_llama_dir, tmp_path / "llama-a"))
    gpt2 = load_adapter(make_adapter(tiny_gpt2_dir, tmp_path / "gpt2-a"))
    other_set = load_adapter(make_adapter(tiny_llama_dir, tmp_path / "llama-q", targets="q_proj", rank=8))
    model = load_model(resolve_model(str(tiny_llama_dir)), head="causal-lm")
    with pytest.raises(IncompatibleError, match=r"llama-a .* and gpt2-a .*different bases or factor sets"):
        load_multi(model, [llama, gpt2], ["llama-a", "gpt2-a"])
    with pytest.raises(IncompatibleError, match=r"llama-a .* and llama-q "):
        load_multi(model, [llama, other_set], ["llama-a", "llama-q"])
    assert not any(isinstance(m, MultiXSLinear) for m in model.modules())


def test_lower_rank_adapter_on_the_same_factor_set_is_zero_padded(tiny_llama_dir, tmp_path):
    """A rank-2 adapter from the rank-4 factor set stacks with rank-4 ones (R padded with zeros)."""
    dirs = [
        make_adapter(tiny_llama_dir, tmp_path / "r4", seed=1),
        make_adapter(tiny_llama_dir, tmp_path / "r2", rank=2, seed=2, r_std=0.3),
        make_adapter(tiny_llama_dir, tmp_path / "r4b", seed=3),
    ]
    assert load_adapter(dirs[1]).config.factors["id"] == load_adapter(dirs[0]).config.factors["id"]
    _check_rows_match_alone(tiny_llama_dir, dirs, fused=True)
