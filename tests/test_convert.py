"""`loraxs convert`: exact export to PEFT LoRA (its config written and read back by PEFT, the adapter
loaded by peft.PeftModel), projection of PEFT LoRA onto the LoRA-XS factors (retained energy), and
`inspect`. The official LoRA-XS/LoRA-SB import is in test_official_format.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli.adapter import apply_adapter, load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.models import ResolvedModel, head_kwargs, load_model
from models_for_tests import make_adapter

peft = pytest.importorskip("peft")
runner = CliRunner()
IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 3], [8, 8, 1200, 64, 5, 19, 2, 700]])


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def load(model_dir: Path, task: str | None, labels=None):
    kwargs = head_kwargs(task, labels) if task else {"head": "base"}
    torch.manual_seed(0)
    return load_model(ResolvedModel(str(model_dir), "dir", model_dir), dtype=torch.float32, **kwargs)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def loraxs_logits(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    adapter = load_adapter(adapter_dir)
    model = load(model_dir, adapter.config.task, adapter.config.labels)
    apply_adapter(model, adapter)
    return logits(model)


def peft_logits(model_dir: Path, peft_dir: Path, task: str, labels=None) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(load(model_dir, task, labels), str(peft_dir))
    return logits(model.eval())


def test_export_peft_llama_is_exact_and_pads(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "xs", rank=4, alpha=8)
    result = invoke("convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft", "--json")
    assert result.exit_code == 0, result.output
    assert "vLLM" not in result.stderr and not result.stderr.strip()  # any rank up to --max-lora-rank
    doc = json.loads(result.stdout)
    assert doc["rank"] == 4 and doc["lora_alpha"] == 8 and doc["modules"] == 14
    assert doc["config_written_by"] == f"peft {peft.__version__}" and doc["modules_to_save"] == []
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["peft_version"] == peft.__version__  # PEFT's own save_pretrained wrote it
    read = peft.LoraConfig.from_pretrained(str(tmp_path / "peft"))
    assert (read.r, read.lora_alpha, read.task_type) == (4, 8, "CAUSAL_LM")
    assert set(read.target_modules) == set(load_adapter(adapter).config.modules)
    assert read.modules_to_save is None and not read.fan_in_fan_out and read.lora_dropout == 0.0
    reference = loraxs_logits(tiny_llama_dir, adapter)
    base = logits(load(tiny_llama_dir, "causal-lm"))
    assert (reference - base).abs().max() > 1e-3
    assert torch.allclose(peft_logits(tiny_llama_dir, tmp_path / "peft", "causal-lm"), reference, atol=1e-5)
    padded = run_json(
        "convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft16", "--pad-rank", "16"
    )
    assert padded["rank"] == 16 and padded["lora_alpha"] == 32  # scaling 2 preserved
    weights = load_file(tmp_path / "peft16" / "adapter_model.safetensors")
    lora_a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert lora_a.shape == (16, 64) and not lora_a[4:].any()
    assert torch.allclose(peft_logits(tiny_llama_dir, tmp_path / "peft16", "causal-lm"), reference, atol=1e-5)
    # inspect shows what the export produced
    shown = run_json("inspect", tmp_path / "peft16")
    # 2 layers x r x sum(m + n) over the 7 projections
    assert shown["format"] == "peft-lora" and shown["rank"] == 16 and shown["modules"] == 14
    assert shown["params"] == sum(v.numel() for v in weights.values()) == 2 * 16 * 1024
    assert shown["bytes"] >= (tmp_path / "peft16" / "adapter_model.safetensors").stat().st_size


def test_export_peft_bert_head_and_gpt2(tiny_bert_dir, tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    labels = ["neg", "pos"]  # the tiny base has a 2-way head
    adapter = make_adapter(tiny_bert_dir, tmp_path / "xs", task="seq-cls", labels=labels)
    result = invoke(
        "convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft", "--pad-rank", 8, "--json"
    )
    assert result.exit_code == 0, result.output
    notice = result.stderr.strip().splitlines()
    assert len(notice) == 1 and "vLLM refuses adapters with modules_to_save" in notice[0], notice
    doc = json.loads(result.stdout)
    assert doc["head_params"] == 64 * 2 + 2 and doc["modules_to_save"] == ["classifier"]
    assert doc["labels"] == labels
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    reference = loraxs_logits(tiny_bert_dir, adapter)
    got = peft_logits(tiny_bert_dir, tmp_path / "peft", "seq-cls", labels)
    assert torch.allclose(got, reference, atol=1e-5)
    # a PEFT user gets the names from the export's label map, the way its model card shows
    label_map = json.loads((tmp_path / "peft" / "label_map.json").read_text())
    assert label_map == {
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
    }
    assert "label_map.json" in (tmp_path / "peft" / "README.md").read_text()
    torch.manual_seed(0)
    id2label = {int(i): name for i, name in label_map["id2label"].items()}
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, id2label=id2label, label2id=label_map["label2id"]
    )
    user = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    assert user.config.id2label == dict(enumerate(labels)) and user.config.num_labels == 2
    with torch.no_grad():
        assert torch.allclose(user(input_ids=IDS).logits, reference, atol=1e-5)
    # and back: the import reads the label map, so the names survive the round trip
    back = run_json(
        "convert",
        tmp_path / "peft",
        "--from",
        "peft-lora",
        "--model",
        tiny_bert_dir,
        "--out",
        tmp_path / "back",
    )
    assert back["labels"] == labels and load_adapter(tmp_path / "back").config.labels == labels
    gpt2 = make_adapter(tiny_gpt2_dir, tmp_path / "gpt2-xs")
    run_json("convert", gpt2, "--to", "peft-lora", "--out", tmp_path / "gpt2-peft")
    assert json.loads((tmp_path / "gpt2-peft" / "adapter_config.json").read_text())["fan_in_fan_out"]
    got = peft_logits(tiny_gpt2_dir, tmp_path / "gpt2-peft", "causal-lm")
    assert torch.allclose(got, loraxs_logits(tiny_gpt2_dir, gpt2), atol=1e-5)


def test_export_without_peft_writes_a_config_peft_reads(tiny_llama_dir, tmp_path, monkeypatch):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "xs", rank=4, alpha=8)
    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would also drop LORAXS_HOME
        patch.setitem(sys.modules, "peft", None)  # `import peft` fails: not installed
        doc = run_json("convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft")
    assert doc["config_written_by"] == "loraxs"
    read = peft.LoraConfig.from_pretrained(str(tmp_path / "peft"))
    assert (read.r, read.lora_alpha, read.task_type) == (4, 8, "CAUSAL_LM")
    got = peft_logits(tiny_llama_dir, tmp_path / "peft", "causal-lm")
    assert torch.allclose(got, loraxs_logits(tiny_llama_dir, adapter), atol=1e-5)


def test_import_peft_inside_factor_span_keeps_everything(tiny_llama_dir, tmp_path):
    """A LoRA whose update is B M A for the XS factors (here: an exported loraxs adapter) projects exactly."""
    adapter = make_adapter(tiny_llama_dir, tmp_path / "xs", rank=4, alpha=8)
    run_json("convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft", "--pad-rank", "8")
    doc = run_json(
        "convert",
        tmp_path / "peft",
        "--from",
        "peft-lora",
        "--model",
        tiny_llama_dir,
        "--out",
        tmp_path / "back",
        "--rank",
        "4",
    )
    print(f"\nin-span LoRA: retained {doc['retained_energy']:.6f}")
    assert doc["retained_energy"] > 0.9999 and doc["lora_rank"] == 8 and doc["factors"]["cache_hit"]
    assert min(m["retained"] for m in doc["per_module"].values()) > 0.9999
    original, back = load_adapter(adapter), load_adapter(tmp_path / "back")
    for name, r in original.R.items():  # s = 2 there, s = 1 here: R doubles
        assert torch.allclose(back.R[name], 2 * r, atol=1e-5)
    assert torch.allclose(
        loraxs_logits(tiny_llama_dir, tmp_path / "back"), loraxs_logits(tiny_llama_dir, adapter), atol=1e-5
    )
    shown = run_json("inspect", tmp_path / "back")
    assert shown["extra"]["converted_from"]["format"] == "peft-lora" and shown["params"] == 16 * 14


def test_import_random_peft_lora_keeps_expected_share(tiny_llama_dir, tmp_path):
    """A random LoRA is independent of the factors: E[retained] = r^2 / (m n) per module."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        load(tiny_llama_dir, "causal-lm"),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    model.save_pretrained(tmp_path / "peft")
    rank = 16
    doc = run_json(
        "convert",
        tmp_path / "peft",
        "--from",
        "peft-lora",
        "--model",
        tiny_llama_dir,
        "--out",
        tmp_path / "xs",
        "--rank",
        rank,
    )
    shapes = {"q_proj": (64, 64), "v_proj": (32, 64), "down_proj": (64, 128)}
    expected_sum = total = 0.0
    for name, row in doc["per_module"].items():
        m, n = shapes[name.rsplit(".", 1)[-1]]
        expected = rank * rank / (m * n)
        assert 0.3 * expected < row["retained"] < 2.5 * expected, (name, row, expected)
        expected_sum += expected * row["update_norm_sq"]
        total += row["update_norm_sq"]
    print(f"\nrandom LoRA: retained {doc['retained_energy']:.4f}, expected {expected_sum / total:.4f}")
    assert abs(doc["retained_energy"] - expected_sum / total) < 0.35 * expected_sum / total
    # the projected adapter's update is the orthogonal projection of the LoRA's
    adapter = load_adapter(tmp_path / "xs")
    assert adapter.config.rank == rank and len(adapter.config.modules) == 6


def test_convert_bad_inputs(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "xs")
    run_json("convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft")
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    cases = [
        (("convert", adapter, "--out", tmp_path / "o"), 2, "exactly one of"),
        (
            ("convert", adapter, "--to", "peft-lora", "--from", "official", "--out", tmp_path / "o"),
            2,
            "exactly",
        ),
        (("convert", adapter, "--to", "gguf", "--out", tmp_path / "o"), 2, "'gguf' is not one of"),
        (("convert", tmp_path / "peft", "--from", "peft-lora", "--out", tmp_path / "o"), 2, "needs --model"),
        (("convert", adapter, "--to", "peft-lora", "--out", tmp_path / "o", "--pad-rank", "2"), 2, "below"),
        (("convert", adapter, "--to", "peft-lora", "--out", tmp_path / "peft"), 3, "--force"),
        (
            ("convert", tmp_path / "peft", "--to", "peft-lora", "--out", tmp_path / "o"),
            3,
            "not a loraxs adapter",
        ),
        (
            (
                "convert",
                tmp_path / "nope",
                "--from",
                "peft-lora",
                "--model",
                tiny_llama_dir,
                "--out",
                tmp_path / "o",
            ),
            3,
            "no such adapter",
        ),
        (
            ("convert", dora, "--from", "peft-lora", "--model", tiny_llama_dir, "--out", tmp_path / "o"),
            3,
            "DoRA",
        ),
        (
            (
                "convert",
                tmp_path / "peft",
                "--from",
                "peft-lora",
                "--model",
                tiny_gpt2_dir,
                "--out",
                tmp_path / "o",
            ),
            4,
            "not a linear layer",
        ),
        (
            (
                "convert",
                tmp_path / "peft",
                "--from",
                "official",
                "--model",
                tiny_llama_dir,
                "--out",
                tmp_path / "o",
            ),
            3,
            "lacks",
        ),
    ]
    for args, code, message in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_convert_as_subprocess(tiny_bert_dir, tmp_path, loraxs_home):
    adapter = make_adapter(tiny_bert_dir, tmp_path / "xs", task="seq-cls", labels=["neg", "pos"])
    command = [
        sys.executable,
        "-m",
        "loraxs_cli",
        "convert",
        str(adapter),
        "--to",
        "peft-lora",
        "--out",
        str(tmp_path / "peft"),
        "--pad-rank",
        "16",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "PEFT LoRA, rank 16" in result.stdout
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
