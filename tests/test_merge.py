"""`loraxs merge`: streaming shard-by-shard merge on tiny Llama, BERT (with head), GPT-2 (Conv1D), a
multi-shard checkpoint (layout, index, peak memory) and the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli.adapter import apply_adapter, load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.models import ResolvedModel, head_kwargs, load_model
from models_for_tests import make_adapter, tiny_llama

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def merge_json(model: Path, adapter: Path, out: Path, *extra) -> dict:
    result = invoke("merge", model, "--adapter", adapter, "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_and_merged(model_dir: Path, adapter_dir: Path, merged_dir: Path, ids: torch.Tensor):
    adapter = load_adapter(adapter_dir)
    task = adapter.config.task
    kwargs = head_kwargs(task, adapter.config.labels)
    base = load_model(ResolvedModel(str(model_dir), "dir", model_dir), dtype=torch.float32, **kwargs)
    apply_adapter(base, adapter)
    merged = load_model(ResolvedModel(str(merged_dir), "dir", merged_dir), dtype=torch.float32, **kwargs)
    return outputs(base, ids), outputs(merged, ids)


IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 3], [8, 8, 1200, 64, 5, 19, 2, 700]])


def test_merge_tiny_llama_verify_layout_and_logits(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", rank=4)
    out = tmp_path / "merged"
    doc = merge_json(tiny_llama_dir, adapter, out, "--verify")
    assert doc["merged_modules"] == 14 and doc["verify"]["relative_diff"] < 1e-5
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "generation_config.json",
    } <= names
    assert not list(tmp_path.glob(".merged.tmp-*"))
    assert "merged LoRA-XS adapter" in (out / "README.md").read_text()
    reference, merged = reference_and_merged(tiny_llama_dir, adapter, out, IDS)
    assert torch.allclose(reference, merged, atol=1e-4)
    base = load_model(ResolvedModel("b", "dir", tiny_llama_dir), head="causal-lm")
    assert (outputs(base, IDS) - merged).abs().max() > 1e-3  # the adapter did change the model
    # only target weights changed; tied embeddings written once, untouched
    before = load_file(tiny_llama_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(before) == set(after) and "lm_head.weight" not in after
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.{m}.weight" for m in load_adapter(adapter).config.modules}


def test_merge_bert_classifier_head_and_dtype(tiny_bert_dir, tmp_path):
    adapter = make_adapter(tiny_bert_dir, tmp_path / "adapter", task="seq-cls", labels=["neg", "pos"])
    out = tmp_path / "merged"
    doc = merge_json(tiny_bert_dir, adapter, out, "--verify")
    assert doc["head"] == ["classifier.bias", "classifier.weight"]
    merged = load_file(out / "model.safetensors")
    head = load_adapter(adapter).head
    assert torch.equal(merged["classifier.weight"], head["classifier.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["architectures"] == ["BertForSequenceClassification"]
    reference, got = reference_and_merged(tiny_bert_dir, adapter, out, IDS)
    assert torch.allclose(reference, got, atol=1e-5)
    # --dtype bf16: every float tensor written in bf16, config says so, verify uses the 16-bit tolerance
    out16 = tmp_path / "merged-bf16"
    doc16 = merge_json(tiny_bert_dir, adapter, out16, "--dtype", "bf16", "--verify")
    assert doc16["verify"]["tolerance"] == 5e-2
    assert {t.dtype for t in load_file(out16 / "model.safetensors").values() if t.is_floating_point()} == {
        torch.bfloat16
    }
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_gpt2_conv1d(tiny_gpt2_dir, tmp_path):
    adapter = make_adapter(tiny_gpt2_dir, tmp_path / "adapter", rank=4)
    out = tmp_path / "merged"
    doc = merge_json(tiny_gpt2_dir, adapter, out, "--verify")
    assert doc["merged_modules"] == 8  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj x 2 layers
    reference, merged = reference_and_merged(tiny_gpt2_dir, adapter, out, IDS)
    assert torch.allclose(reference, merged, atol=1e-4)


def save_sharded_llama(directory: Path, shard_size: str, **shape) -> Path:
    """A random Llama saved in shards of `shard_size` (with an index), without tokenizer."""
    tiny_llama(max_position_embeddings=128, **shape).save_pretrained(directory, max_shard_size=shard_size)
    return directory


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A ~30 MB Llama in ~4 MB shards."""
    return save_sharded_llama(
        tmp_path_factory.mktemp("sharded-llama"), "4MB",
        vocab_size=2048, hidden_size=320, intermediate_size=896, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4,
    )  # fmt: skip


def test_merge_multi_shard_keeps_layout_and_adds_head(sharded_llama, tmp_path):
    """A classifier trained on a causal-LM base: the head is added to the last shard and the index."""
    adapter = make_adapter(sharded_llama, tmp_path / "adapter", task="seq-cls", labels=["a", "b"])
    out = tmp_path / "merged"
    doc = merge_json(sharded_llama, adapter, out, "--verify")
    shards = sorted(p.name for p in sharded_llama.glob("*.safetensors"))
    assert len(shards) >= 4 and sorted(doc["shards"]) == shards
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = json.loads((sharded_llama / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["score.weight"] == shards[-1]
    assert {k: v for k, v in index["weight_map"].items() if k != "score.weight"} == original["weight_map"]
    for shard in shards:  # every shard holds exactly the tensors the index says
        with safe_open(str(out / shard), "pt") as handle:
            assert set(handle.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
    assert doc["verify"]["relative_diff"] < 1e-5


PEAK_SCRIPT = """
import json, sys, psutil
from pathlib import Path
from loraxs_cli.merge import plan_merge, run_merge

def high_water_mark():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

plan = plan_merge(sys.argv[1], sys.argv[2], sys.argv[3])
Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure the merge alone
before = psutil.Process().memory_info().rss
run_merge(plan)
print(json.dumps({"before": before, "peak": high_water_mark(), "checkpoint": plan.checkpoint_bytes,
                  "shard": plan.largest_shard_bytes, "shards": len(plan.shards)}))
"""


@pytest.fixture(scope="module")
def large_sharded_llama(tmp_path_factory) -> Path:
    """A ~120 MB Llama in ~10 MB shards: large enough that the allocator's fixed ~10 MiB of noise
    does not decide whether the merge's peak looks like one shard or like the whole model."""
    return save_sharded_llama(
        tmp_path_factory.mktemp("large-sharded-llama"), "10MB",
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4,
    )  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
def test_merge_peak_memory_is_about_one_shard(large_sharded_llama, tmp_path, loraxs_home):
    """Run in a fresh process: the peak RSS added by the merge is a few shards, not the checkpoint."""
    adapter = make_adapter(large_sharded_llama, tmp_path / "adapter", rank=8)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(large_sharded_llama), str(adapter), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    added = figures["peak"] - figures["before"]
    print(
        f"\nmerge peak RSS: +{added / 2**20:.1f} MiB over {figures['before'] / 2**20:.0f} MiB baseline; "
        f"checkpoint {figures['checkpoint'] / 2**20:.1f} MiB in {figures['shards']} shards "
        f"(largest {figures['shard'] / 2**20:.1f} MiB)"
    )
    assert figures["shards"] >= 8
    # At most three copies of one shard live at once: the source's mapped pages, the merged tensors, and
    # the bytes safetensors' save_file serializes them into (+ ~10 MiB of allocator noise); loading the
    # checkpoint would add all of it.
    assert added < min(0.5 * figures["checkpoint"], 3 * figures["shard"] + 10 * 2**20)


def test_merge_dry_run_writes_nothing(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    doc = merge_json(tiny_llama_dir, adapter, tmp_path / "merged", "--dry-run")
    assert doc["dry_run"] and doc["shards"] == ["model.safetensors"] and doc["target_modules"] == 14
    assert doc["estimated_peak_bytes"] > doc["largest_shard_bytes"]
    assert not (tmp_path / "merged").exists()


def test_merge_failure_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    from loraxs_cli import merge as merge_module

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "_write_index", broken)
    result = invoke("merge", tiny_llama_dir, "--adapter", adapter, "--out", tmp_path / "merged")
    assert result.exit_code == 130
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def test_merge_refuses_existing_output_without_force(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = invoke("merge", tiny_llama_dir, "--adapter", adapter, "--out", out)
    assert result.exit_code == 3 and "--force" in result.output and (out / "keep.txt").exists()
    assert len(result.output.strip().splitlines()) == 1
    assert invoke("merge", tiny_llama_dir, "--adapter", adapter, "--out", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_merge_bad_inputs(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    cases = [
        ((tiny_gpt2_dir, "--adapter", adapter), 4, "trained on base"),  # another base
        ((tiny_llama_dir, "--adapter", tmp_path / "nope"), 3, "no such adapter"),
        ((tmp_path / "missing-model", "--adapter", adapter), 3, "no such model"),
        ((tiny_llama_dir, "--adapter", adapter, "--dtype", "int3"), 2, "'int3' is not one of"),
        ((tiny_llama_dir, "--adapter", adapter, "--out", tiny_llama_dir), 3, "base model's directory"),
    ]
    for args, code, message in cases:
        full = ["merge", *args] + ([] if "--out" in args else ["--out", tmp_path / "o"])
        result = invoke(*full)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_merge_bin_only_base_is_refused(tmp_path):
    directory = tmp_path / "bin-model"
    tiny_llama(vocab_size=256).save_pretrained(directory)
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    adapter = make_adapter(directory, tmp_path / "adapter")
    result = invoke("merge", directory, "--adapter", adapter, "--out", tmp_path / "m")
    assert result.exit_code == 3 and "safetensors" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_merge_as_subprocess(tiny_gpt2_dir, tmp_path, loraxs_home):
    adapter = make_adapter(tiny_gpt2_dir, tmp_path / "adapter")
    command = [
        sys.executable,
        "-m",
        "loraxs_cli",
        "--json",
        "merge",
        str(tiny_gpt2_dir),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp_path / "merged"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["merged_modules"] == 8
    again = invoke(*command[4:])
    assert again.exit_code == 3 and "exists" in again.output


@pytest.mark.real
def test_merge_smollm2_verify(smollm2_path, tmp_path):
    adapter = make_adapter(smollm2_path, tmp_path / "adapter", rank=8, targets="q_proj,v_proj")
    out = tmp_path / "merged"
    doc = merge_json(smollm2_path, adapter, out, "--verify", "--dtype", "bf16")
    assert doc["merged_modules"] == 60 and doc["verify"]["relative_diff"] < 5e-2
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    assert (out / "model.safetensors").stat().st_size < 0.6 * (
        smollm2_path / "model.safetensors"
    ).stat().st_size
