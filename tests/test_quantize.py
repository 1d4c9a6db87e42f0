"""`--quantize int8|nf4` (quantize.py, bitsandbytes on CPU): the layer takes its sizes from the quantized
Linear, not from its packed weight; only the backbone is quantized; no SVD ever sees a quantized weight
(the factors, their cache entry and the fingerprint are the full-precision base's); eval, generate,
train's dry-run and merge --verify on tiny models; the one-line error without bitsandbytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from loraxs_cli import factors as factors_mod
from loraxs_cli.adapter import load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.errors import IncompatibleError
from loraxs_cli.initialize import FactorRequest, describe_base, plan_factors
from loraxs_cli.layer import XSLinear
from loraxs_cli.linear import compute_dtype, weight_shape
from loraxs_cli.models import backbone, load_model, resolve_model
from loraxs_cli.multi import MultiXSLinear
from loraxs_cli.quantize import is_quantized, quantize_linears, require_backend
from models_for_tests import make_adapter

bnb = require_backend("int8")  # bitsandbytes: in the test extra

runner = CliRunner()
KINDS = ("int8", "nf4")
QUANTIZED = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
TEXT = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 3},
    {"text": "What is two plus three? " * 4},
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def invoke_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_layer(kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Linear, nn.Module]:
    """A Linear(48 -> 40) and its quantized twin (the same weights)."""
    torch.manual_seed(0)
    dense = nn.Linear(48, 40).to(dtype)
    holder = nn.Sequential(nn.Linear(48, 40).to(dtype))
    holder[0].load_state_dict(dense.state_dict())
    assert quantize_linears(holder, kind) == ["0"]
    return dense, holder[0]


@pytest.mark.parametrize("kind", KINDS)
def test_the_layer_takes_sizes_and_dtype_from_the_quantized_linear(kind):
    dense, layer = one_layer(kind)
    assert isinstance(layer, QUANTIZED[kind]) and is_quantized(layer)
    assert not layer.weight.dtype.is_floating_point  # int8, or 4-bit packed into uint8
    if kind == "nf4":
        assert tuple(layer.weight.shape) == (40 * 48 // 2, 1)  # packed: not (out, in)
    assert weight_shape(layer) == (40, 48) and compute_dtype(layer) == torch.float32
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 48, generator=gen), torch.randn(40, 4, generator=gen)
    R = torch.randn(4, 4, generator=gen) * 0.1
    xs = XSLinear(layer, A, B, scaling=0.5, R=R)
    assert xs.A.dtype == xs.B.dtype == torch.float32 and not xs.fused  # never fused with a packed weight
    assert (xs.in_features, xs.out_features) == (48, 40)
    x = torch.randn(3, 5, 48, generator=gen, requires_grad=True)
    y = xs(x)
    with torch.no_grad():  # base(x) runs the quantized kernel; the adapter path is the plain s B R A x
        expected = layer(x) + 0.5 * x @ A.t() @ R.t() @ B.t()
        error = (layer(x) - dense(x)).abs().max() / dense(x).abs().max()
    assert torch.allclose(y, expected, atol=1e-4)
    assert 0 < error < 0.1  # it is quantized, and close
    y.square().sum().backward()
    assert xs.R.grad is not None and xs.R.grad.abs().sum() > 0 and x.grad is not None
    assert layer.weight.grad is None
    with pytest.raises(IncompatibleError, match=r"\(40, 48\) weight"):  # the declared sizes, not the packing
        XSLinear(layer, torch.randn(4, 40), B, scaling=1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_layer_trains_after_an_evaluation(kind):
    """An evaluation (eval mode, no grad) between training steps, as --eval-every does: bitsandbytes'
    CPU repacking of a 4-bit weight for inference is kept off (it refuses 40 outputs, and a later
    training step would not get its gradient through the packed weight)."""
    _, layer = one_layer(kind)
    x = torch.randn(4, 48, requires_grad=True)
    layer(x).square().sum().backward()
    grad, x.grad = x.grad.clone(), None
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x.detach())
    layer.train()
    y = layer(x)
    y.square().sum().backward()
    assert torch.allclose(evaluated, y.detach(), atol=0.05 * float(y.detach().abs().max()))
    assert torch.equal(x.grad, grad)


def test_a_quantized_layer_computes_in_the_dtype_it_was_loaded_in():
    _, layer = one_layer("nf4", torch.bfloat16)
    assert compute_dtype(layer) == torch.bfloat16
    _, int8 = one_layer("int8", torch.bfloat16)
    assert compute_dtype(int8) == torch.bfloat16
    xs = XSLinear(layer, torch.randn(4, 48), torch.randn(40, 4), scaling=1.0)
    assert xs.A.dtype == torch.bfloat16
    assert xs(torch.randn(2, 48, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_gpt2_conv1d_is_quantized_as_the_linear_it_computes():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    holder = nn.Sequential(Conv1D(40, 48))  # nf 40 out, nx 48 in: weight stored (48, 40)
    x = torch.randn(6, 48)
    with torch.no_grad():
        want = holder[0](x)
    assert weight_shape(holder[0]) == (40, 48)
    quantize_linears(holder, "int8")
    assert isinstance(holder[0], bnb.nn.Linear8bitLt) and weight_shape(holder[0]) == (40, 48)
    with torch.no_grad():
        assert (holder[0](x) - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_backbone_linears_are_quantized(tiny_llama_dir, tiny_bert_dir, kind):
    model = load_model(resolve_model(str(tiny_llama_dir)), head="causal-lm", quantize=kind)
    core = backbone(model)
    linears = {n: m for n, m in core.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 14 and all(isinstance(m, QUANTIZED[kind]) for m in linears.values())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32  # the head
    assert model.lm_head.weight is core.embed_tokens.weight  # still tied: embeddings untouched
    classifier = load_model(resolve_model(str(tiny_bert_dir)), head="seq-cls", num_labels=2, quantize=kind)
    assert type(classifier.classifier) is nn.Linear  # outside the backbone
    assert isinstance(classifier.bert.pooler.dense, QUANTIZED[kind])  # inside it
    assert type(classifier.bert.embeddings.word_embeddings) is nn.Embedding


def test_no_svd_ever_sees_a_quantized_weight(tiny_llama_dir, tmp_path, monkeypatch):
    """A cold cache with --quantize: every matrix the SVD gets is a plain float32 tensor equal to the
    checkpoint's weight. The entry is the one an unquantized run hits (same id, sha256, fingerprint),
    and a warm cache with --quantize runs no SVD at all."""
    seen: dict[str, torch.Tensor] = {}
    original = factors_mod.xs_factor_pair

    def spy(matrix, rank, settings, name=""):
        assert type(matrix) is torch.Tensor and matrix.dtype == torch.float32, (name, type(matrix))
        seen[name] = matrix.detach().clone()
        return original(matrix, rank, settings, name)

    monkeypatch.setattr(factors_mod, "xs_factor_pair", spy)
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    common = ("--rank", "4", "--batch-size", "2", "--max-length", "32", "--max-steps", "2")
    quantized = invoke_json("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "q", *common,
                            "--quantize", "int8")  # fmt: skip
    assert quantized["cache"] == "miss"
    checkpoint = load_file(tiny_llama_dir / "model.safetensors")
    assert len(seen) == 14
    for name, matrix in seen.items():
        assert torch.equal(matrix, checkpoint[f"model.{name}.weight"].float()), name
    adapter = load_adapter(tmp_path / "q" / "adapter").config
    assert adapter.extra["training"]["quantized"] == "int8"
    plan = plan_factors(FactorRequest(model=str(tiny_llama_dir), rank=4))  # the unquantized recipe
    assert plan.entry is not None and adapter.factors["id"] == plan.entry.id == quantized["factor_entry"]
    assert adapter.factors["sha256"] == plan.entry.sha256
    assert adapter.base["fingerprint"] == describe_base(str(tiny_llama_dir)).fingerprint
    assert "quantized to int8" in (tmp_path / "q" / "adapter" / "README.md").read_text()
    seen.clear()
    plain = invoke_json("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "plain", *common)
    nf4 = invoke_json("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "nf4", *common,
                      "--quantize", "nf4")  # fmt: skip
    assert plain["cache"] == nf4["cache"] == "hit" and not seen  # no SVD on a hit, quantized or not
    assert plain["factor_entry"] == nf4["factor_entry"] == quantized["factor_entry"]
    assert "quantized" not in load_adapter(tmp_path / "plain" / "adapter").config.extra["training"]


def test_dry_run_plans_the_quantized_base(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    args = ("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "run", "--rank", "4",
            "--max-length", "32", "--batch-size", "2", "--dry-run")  # fmt: skip
    plain = invoke_json(*args, "--no-measure")
    plan = invoke_json(*args, "--quantize", "nf4")  # --measure: one step timed on the quantized base
    assert plan["quantize"] == "nf4" and plain["quantize"] is None
    linear = sum(i.out_features * i.in_features for i in describe_base(str(tiny_llama_dir)).modules.values())
    assert plain["weights_bytes"] - plan["weights_bytes"] == 4 * linear - (linear // 2 + linear // 64)
    assert plan["step_seconds"] > 0
    text = invoke(*args, "--quantize", "int8", "--no-measure")
    assert text.exit_code == 0 and "int8-quantized linear layers" in text.output


@pytest.mark.parametrize("kind", KINDS)
def test_eval_and_generate_on_a_quantized_base(tiny_llama_dir, tmp_path, kind):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", r_std=0.5, embed_factors=True)
    data = write_jsonl(tmp_path / "eval.jsonl", TEXT)
    plain = invoke_json("eval", tiny_llama_dir, "--data", data, "-a", adapter, "--max-length", "32")
    quantized = invoke_json("eval", tiny_llama_dir, "--data", data, "-a", adapter, "--max-length", "32",
                            "--quantize", kind)  # fmt: skip
    assert quantized["quantize"] == kind
    loss, base_loss = quantized["results"][0]["loss"], plain["results"][0]["loss"]
    assert loss != base_loss and abs(loss - base_loss) < 0.05 * base_loss  # quantized, and close
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"adapter": "adapter", "prompt": "The quick"},
                                                       {"adapter": None, "prompt": "What is"}])  # fmt: skip
    result = invoke("generate", tiny_llama_dir, "-a", f"adapter={adapter}", "--prompts", prompts,
                    "--max-new-tokens", "4",
                    "--quantize", kind)  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["row"] for r in rows) == [0, 1] and all(r["output"] for r in rows)


def test_stacked_adapters_on_a_quantized_base_are_not_fused():
    _, layer = one_layer("nf4")
    stacked = MultiXSLinear(layer, torch.randn(4, 48), torch.randn(40, 4), torch.zeros(2, 4, 4), rows=None)
    assert not stacked.fused and stacked.A.dtype == torch.float32


def test_merge_of_an_adapter_trained_on_a_quantized_base(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    invoke_json("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "run", "--rank", "4",
                "--max-length", "32", "--batch-size", "2", "--max-steps", "3", "--lr", "5e-2",
                "--save-every", "0", "--quantize", "int8")  # fmt: skip
    adapter = tmp_path / "run" / "adapter"
    doc = invoke_json("merge", tiny_llama_dir, "--adapter", adapter, "--out", tmp_path / "merged", "--verify")
    assert doc["trained_quantized"] == "int8"
    exact, quantized = doc["verify"], doc["verify"]["quantized"]
    assert exact["relative_diff"] < 1e-5  # written into the full-precision weights
    assert quantized["quantize"] == "int8" and 0 < quantized["relative_diff"] <= quantized["tolerance"]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "merged into the full-precision weights" in card and "int8-quantized base + adapter" in card
    text = invoke("merge", tiny_llama_dir, "--adapter", adapter, "--out", tmp_path / "m2", "--verify",
                  "--quantize", "nf4")  # fmt: skip
    assert text.exit_code == 0, text.output
    assert "full-precision weights" in text.output and "nf4-quantized base + adapter" in text.output
    refused = invoke(
        "merge", tiny_llama_dir, "--adapter", adapter, "--out", tmp_path / "m3", "--quantize", "nf4"
    )
    assert refused.exit_code == 2 and "needs --verify" in refused.output


def test_without_bitsandbytes_one_line_and_exit_2(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    data = write_jsonl(tmp_path / "data.jsonl", TEXT)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The quick"}])
    for args in (
        ("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "run", "--quantize", "int8"),
        ("eval", tiny_llama_dir, "--data", data, "--quantize", "nf4"),
        ("generate", tiny_llama_dir, "--prompts", prompts, "--quantize", "int8"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "needs the bitsandbytes package: pip install 'loraxs[quant]'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_memory_benchmark_runs_every_variant(capsys):
    """benchmarks/bench_quantized.py in its tiny mode, in this process: a row per variant, the quantized
    tensors smaller than bf16's (figures for shape and sign only)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quantized.py"
    spec = importlib.util.spec_from_file_location("bench_quantized", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--in-process", "--json"])
    rows = {row["variant"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert list(rows) == ["bf16", "int8", "nf4"] and all(r["modules"] == 14 for r in rows.values())
    assert rows["nf4"]["tensor_bytes"] < rows["int8"]["tensor_bytes"] < rows["bf16"]["tensor_bytes"]
    assert all(r["peak_bytes"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
