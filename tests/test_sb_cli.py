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
        (["--method", "sb", "--data", "{data}", "--sb-lr", "0"], 2, "--sb-lr must be positive"),
        (["--method", "sb", "--data", "{data}", "--samples", "0"], 2, "must be positive"),
        (["--method", "sb", "--data", "{data}", "--max-grad-memory", "lots"], 3, "not a memory size"),
        (["--method", "sb", "--data", "{data}", "--task", "translation"], 2, "translation"),
        (["--method", "sb", "--data", "{missing}"], 3, "missing.jsonl"),
        (["--method", "sb", "--data", "{data}", "--sb-step", "rmsprop"], 2, "'rmsprop' is not one of"),
        (["--method", "sb", "--data", "{data}", "--sb-grad-mode", "dropout"], 2, "'dropout' is not one of"),
        (["--method", "sb", "--data", "{data}", "--sb-accum-dtype", "fp16"], 2, "'fp16' is not one of"),
    ],
)
def test_bad_sb_options_fail_in_one_line(tiny_llama_dir, data, tmp_path, loraxs_home, args, code, message):
    filled = [a.format(data=data, missing=tmp_path / "missing.jsonl") for a in args]
    result = runner.invoke(app, ["init", str(tiny_llama_dir), "-r", "4", *filled])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not list(FactorCache(loraxs_home).entries())


# ----------------------------------------------------------------------------------------------
# The official LoRA-SB code's settings, on request: each recorded, each its own cache entry

DEFAULT_SB_RECIPE_KEYS = {"data_sha256", "samples", "task", "labels", "seed", "batch_size", "max_length",
                          "held_out_split", "eta", "eps", "weight_decay"}  # fmt: skip


def entry_meta(doc: dict) -> dict:
    return json.loads((Path(doc["path"]) / "meta.json").read_text())


def test_official_sb_settings_are_recorded_and_cached_apart(tiny_llama_dir, data):
    default = init_sb(tiny_llama_dir, data, "--samples", "8")
    assert set(default["sb"]) == DEFAULT_SB_RECIPE_KEYS  # the defaults' recipe (cache key) is unchanged
    recorded = entry_meta(default)["sb"]  # the run's record (not the key) names every setting
    assert (recorded["grad_mode"], recorded["accum_dtype"], recorded["step"]) == ("eval", "float32", "adam")
    spelled_out = init_sb(tiny_llama_dir, data, "--samples", "8", "--sb-step", "adam", "--sb-grad-mode",
                          "eval", "--sb-accum-dtype", "float32")  # fmt: skip
    assert spelled_out["cache"] == "hit" and spelled_out["entry"] == default["entry"]

    sign = init_sb(tiny_llama_dir, data, "--samples", "8", "--sb-step", "sign")
    bf16 = init_sb(tiny_llama_dir, data, "--samples", "8", "--sb-accum-dtype", "bfloat16")
    train_mode = init_sb(tiny_llama_dir, data, "--samples", "8", "--sb-grad-mode", "train")
    assert sign["sb"]["step"] == "sign" and bf16["sb"]["accum_dtype"] == "bfloat16"
    assert train_mode["sb"]["grad_mode"] == "train"
    entries = {doc["entry"] for doc in (default, sign, bf16, train_mode)}
    assert len(entries) == 4 and all(doc["cache"] == "miss" for doc in (sign, bf16, train_mode))
    assert entry_meta(sign)["sb"]["step"] == "sign" and entry_meta(bf16)["sb"]["accum_dtype"] == "bfloat16"

    reference = entry_tensors(default)
    for doc in (sign, bf16):  # another step or rounding: other factors, of the same kind
        tensors = entry_tensors(doc)
        assert any(not torch.equal(tensors[k], reference[k]) for k in reference)
        name = next(k for k in reference if k.endswith(".S"))
        torch.testing.assert_close(tensors[name], reference[name], rtol=0.1, atol=0)
    # A Llama has no dropout: the train-mode pass gives the same gradient, so the same factors.
    tensors = entry_tensors(train_mode)
    assert all(torch.allclose(tensors[k], reference[k], atol=1e-6) for k in reference)

    dry = ["init", tiny_llama_dir, "-r", "4", "--method", "sb", "--data", data, "--samples", "8", "--dry-run"]
    plans = [
        invoke_json(*dry, "--max-length", "16", *extra) for extra in ([], ["--sb-accum-dtype", "bfloat16"])
    ]
    assert plans[1]["accumulator_bytes"] * 2 == plans[0]["accumulator_bytes"]
    assert plans[1]["cache"] == "hit" and plans[1]["entry"] == bf16["entry"]


def test_train_mode_pass_with_dropout_gives_other_factors_reproducibly(tiny_bert_dir, tmp_path):
    rows = [
        {"text": f"item {i} is {'good' if i % 2 else 'bad'}", "label": ["neg", "pos"][i % 2]}
        for i in range(12)
    ]
    cls = write_jsonl(tmp_path / "cls.jsonl", rows)

    def run(*extra):
        sample = ["--data", cls, "--task", "seq-cls", "--samples", "8", "--max-length", "16"]
        return invoke_json("init", tiny_bert_dir, "-r", "4", "--method", "sb", *sample, *extra)

    evaluated, trained = entry_tensors(run()), run("--sb-grad-mode", "train")
    first = entry_tensors(trained)
    assert all(not torch.allclose(first[k], evaluated[k], atol=1e-4) for k in first if k.endswith(".B"))
    again = entry_tensors(run("--sb-grad-mode", "train", "--force"))  # recomputed: the same dropout masks
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_train_takes_the_sb_settings_and_the_official_eta(tiny_llama_dir, data, tmp_path):
    import math

    lr, warmup, epochs, batch = 1e-3, 0.1, 2.0, 4
    official = lr / (warmup * math.ceil(len(ROWS) / batch) * epochs)  # train_arithmetic.py's eff_lr
    settings = ["--sb-step", "sign", "--sb-grad-mode", "train", "--sb-accum-dtype", "bfloat16"]
    sample = ["--max-length", "16", "--batch-size", str(batch), "--sb-lr", repr(official)]
    made = init_sb(tiny_llama_dir, data, "--samples", "8", *sample, *settings)
    assert made["sb"]["eta"] == pytest.approx(8.333e-4, rel=1e-3)
    schedule = ["--lr", str(lr), "--warmup-ratio", str(warmup), "--epochs", str(epochs), "--dry-run"]
    sample = ["--max-length", "16", "--sb-samples", "8", "--sb-batch-size", str(batch)]
    train_args = ["train", tiny_llama_dir, "--data", data, "--out", tmp_path / "run", "--method", "sb",
                  "-r", "4", *sample, *schedule]  # fmt: skip
    plan = invoke_json(*train_args, "--sb-official-eta", *settings)
    assert plan["cache"] == f"hit ({made['entry']})"  # the same recipe: same eta, step, mode and dtype
    assert invoke_json(*train_args, *settings)["cache"].startswith("miss")  # --sb-lr's 3e-4 instead

    no_warmup = [("0" if a == str(warmup) else a) for a in train_args]  # --warmup-ratio 0
    result = runner.invoke(app, [str(a) for a in no_warmup] + ["--sb-official-eta"])
    assert result.exit_code == 2, result.output
    assert "--sb-official-eta needs --warmup-ratio > 0" in result.output and "Traceback" not in result.output
