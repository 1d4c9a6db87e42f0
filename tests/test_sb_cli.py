"""LoRA-SB through the CLI on a tiny Llama: the cache recipe names the gradient sample, grouped passes
give the same factors, `train --method sb` starts exactly at W + B diag(S) A, and bad options fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli.cache import FACTORS_FILE, FactorCache
from loraxs_cli.cli.app import app
from loraxs_cli.models import backbone, head_kwargs, load_model, resolve_model, weight_matrix
from loraxs_cli.train import Dist, TrainConfig, TrainEvents, prepare

runner = CliRunner()
ROWS = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(6) for b in range(4)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke_json(*args) -> dict:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def init_sb(model: Path, data: Path, *extra) -> dict:
    return invoke_json(
        "init", model, "-r", "4", "--method", "sb", "--data", data, "--max-length", "16", *extra
    )


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", ROWS)


def entry_tensors(doc: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(doc["path"]) / FACTORS_FILE)


def test_sb_init_is_cached_by_its_sample_and_recorded(tiny_llama_dir, data, tmp_path):
    first = init_sb(tiny_llama_dir, data, "--samples", "8")
    assert first["cache"] == "miss" and first["method"] == "sb"
    sb = first["sb"]
    assert sb["samples"] == 8 and sb["eta"] == 3e-4 and sb["seed"] == 0 and len(sb["data_sha256"]) == 64
    again = init_sb(tiny_llama_dir, data, "--samples", "8")
    assert again["cache"] == "hit" and again["entry"] == first["entry"]
    assert (
        init_sb(tiny_llama_dir, data, "--samples", "8", "-r", "2")["entry"] == first["entry"]
    )  # smaller rank

    other_data = write_jsonl(tmp_path / "other.jsonl", ROWS[::-1][:20])
    others = [
        init_sb(tiny_llama_dir, other_data, "--samples", "8"),
        init_sb(tiny_llama_dir, data, "--samples", "6"),
        init_sb(tiny_llama_dir, data, "--samples", "8", "--sb-lr", "1e-4"),
        init_sb(tiny_llama_dir, data, "--samples", "8", "--seed", "1"),
    ]
    assert all(doc["cache"] == "miss" for doc in others)
    assert len({first["entry"], *(doc["entry"] for doc in others)}) == 5
    # An XS entry of the same base and rank is yet another entry.
    xs = invoke_json("init", tiny_llama_dir, "-r", "4")
    assert xs["cache"] == "miss" and xs["method"] == "xs"

    listing = invoke_json("cache", "ls")
    recorded = {e["id"]: e.get("sb") for e in listing["entries"]}
    assert recorded[first["entry"]]["data_sha256"] == sb["data_sha256"]
    assert recorded[others[2]["entry"]]["eta"] == 1e-4
    assert recorded[xs["entry"]] is None
    text = runner.invoke(app, ["cache", "ls"], env={"COLUMNS": "200"}).output
    assert f"sb (8 samples of {sb['data_sha256'][:8]}" in text


def test_grouped_passes_give_the_same_factors(tiny_llama_dir, data):
    whole = init_sb(tiny_llama_dir, data, "--samples", "8")
    one_pass = entry_tensors(whole)
    # 40 KiB holds one 64x64 or 64x128 float32 accumulator at a time: many passes over the sample.
    plan = invoke_json("init", tiny_llama_dir, "-r", "4", "--method", "sb", "--data", data, "--samples", "8",
                       "--max-length", "16", "--max-grad-memory", "40KiB", "--dry-run")  # fmt: skip
    assert plan["gradient_passes"] > 5
    grouped = init_sb(tiny_llama_dir, data, "--samples", "8", "--max-grad-memory", "40KiB", "--force")
    assert grouped["entry"] == whole["entry"]  # the budget is not part of the recipe
    many_passes = entry_tensors(grouped)
    assert one_pass.keys() == many_passes.keys()
    for key in one_pass:
        assert torch.allclose(one_pass[key], many_passes[key], atol=1e-6), key


def test_train_sb_runs_init_itself_and_starts_at_the_merged_rank_r_step(tiny_llama_dir, data, tmp_path):
    config = TrainConfig(model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "run"), method="sb",
                         rank=4, max_length=16, sb={"samples": 8})  # fmt: skip
    messages = []
    prepared = prepare(config, Dist(), torch.device("cpu"), TrainEvents(message=messages.append))
    assert not prepared.cache_hit and any("miss" in m for m in messages)
    assert prepared.entry.meta["recipe"]["extra"]["sb"]["samples"] == 8

    # Reference: the base with every target weight replaced by W + B diag(S) A, no adapter layer.
    def base_model():
        return load_model(resolve_model(str(tiny_llama_dir)), **head_kwargs("causal-lm", None))

    merged = base_model()
    factors = prepared.entry.load(4, prepared.plan.targets)
    modules = dict(backbone(merged).named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            weight_matrix(modules[name]).add_(f["B"] @ torch.diag(f["S"]) @ f["A"])
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    prepared.model.eval()
    with torch.no_grad():
        ours, reference = prepared.model(input_ids=ids).logits, merged(input_ids=ids).logits
    base = base_model()(input_ids=ids).logits.detach()
    assert not torch.allclose(reference, base, atol=1e-4)  # the step is visible in the outputs
    assert torch.allclose(ours, reference, atol=1e-5)

    # Through the CLI: a cache hit now, and the adapter records its gradient sample.
    run = tmp_path / "cli-run"
    result = runner.invoke(app, ["train", str(tiny_llama_dir), "--data", str(data), "--out", str(run),
                                 "--method", "sb", "-r", "4", "--max-length", "16", "--sb-samples", "8",
                                 "--max-steps", "2", "--batch-size", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "hit" in result.output
    shown = invoke_json("inspect", run / "adapter")
    assert shown["method"] == "sb" and shown["sb"]["samples"] == 8 and shown["factors"]["in_cache"]
    assert "LoRA-SB:    8 samples" in runner.invoke(app, ["inspect", str(run / "adapter")]).output


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--method", "sb"], 2, "--method sb needs --data"),
        (["--method", "sb", "--data", "{data}", "--sb-lr", "0"], 3, "--sb-lr must be positive"),
        (["--method", "sb", "--data", "{data}", "--samples", "0"], 3, "must be positive"),
        (["--method", "sb", "--data", "{data}", "--max-grad-memory", "lots"], 3, "not a memory size"),
        (["--method", "sb", "--data", "{data}", "--task", "translation"], 2, "translation"),
        (["--method", "sb", "--data", "{missing}"], 3, "missing.jsonl"),
    ],
)
def test_bad_sb_options_fail_in_one_line(tiny_llama_dir, data, tmp_path, loraxs_home, args, code, message):
    filled = [a.format(data=data, missing=tmp_path / "missing.jsonl") for a in args]
    result = runner.invoke(app, ["init", str(tiny_llama_dir), "-r", "4", *filled])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list(FactorCache(loraxs_home).entries())
