"""`train` and `eval` through the real CLI on tiny models: the task from the data and the architecture,
the run directory (dry-run = real run, --force), config.yaml round trips, missing factors, best/ ties
and the model card."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli.adapter import load_adapter
from loraxs_cli.cli.app import app

runner = CliRunner()

LM_ROWS = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(4) for b in range(3)]
CLS_ROWS = [
    {"text": f"item {i} {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(12)
]
REG_ROWS = [{"text": f"item {i}", "label": (i % 3) / 2} for i in range(12)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small(*extra) -> list[str]:
    return ["--rank", "4", "--batch-size", "4", "--max-length", "32", "--log-every", "1", *extra]


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    return lines[-1]


@pytest.fixture
def lm_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "lm.jsonl", LM_ROWS)


@pytest.fixture
def cls_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)


@pytest.fixture(scope="session")
def tiny_bert_decoder_dir(tmp_path_factory) -> Path:
    """A tiny BERT whose config declares a decoder (is_decoder): a causal LM transformers supports."""
    import torch
    from transformers import BertConfig, BertLMHeadModel

    from models_for_tests import save_tiny

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, is_decoder=True)  # fmt: skip
    return save_tiny(
        BertLMHeadModel(config), tmp_path_factory.mktemp("bert-decoder"), tokenizer_from="wordpiece"
    )


# ----------------------------------------------------------------------------- 1. the task


def test_encoder_only_model_is_refused_as_a_causal_lm(tiny_bert_dir, lm_data, tmp_path, loraxs_home):
    run = tmp_path / "run"
    for args in (
        ["train", tiny_bert_dir, "--data", lm_data, "--out", run, *small("--max-steps", "2")],
        ["train", tiny_bert_dir, "--data", lm_data, "--out", run, "--task", "causal-lm", "--dry-run"],
        ["eval", tiny_bert_dir, "--data", lm_data],
    ):
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        expected = "encoder-only bert model (no is_decoder in its config) cannot be trained or evaluated"
        assert expected in error_line(result) and "use --task seq-cls" in error_line(result)
    # Refused from the config: no factors computed, no empty run directory left behind.
    assert not (loraxs_home / "factors").exists() and not run.exists()


def test_a_decoder_bert_is_accepted_as_a_causal_lm(tiny_bert_decoder_dir, lm_data, tmp_path):
    result = invoke(
        "train", tiny_bert_decoder_dir, "--data", lm_data, "--out", tmp_path / "r", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["task"] == "causal-lm" and plan["task_inferred"] and plan["head_params"] == 0


def test_task_is_inferred_from_labelled_rows_and_recorded(tiny_bert_dir, cls_data, tmp_path):
    run = tmp_path / "cls"
    result = invoke(
        "train", tiny_bert_dir, "--data", cls_data, "--out", run, *small("--max-steps", "2", "--json")
    )
    assert result.exit_code == 0, result.output
    assert "task: seq-cls (inferred from rows with text and label" in result.output
    doc = json.loads(result.stdout)
    assert doc["head_params"] == 64 * 2 + 2  # a trained classifier head, not "0 in the head"
    adapter = load_adapter(run / "adapter")
    assert adapter.config.task == "seq-cls" and adapter.config.labels == ["neg", "pos"]
    assert yaml.safe_load((run / "config.yaml").read_text())["task"] == "seq-cls"
    # eval without --task on the base model infers the same task: accuracy, not a perplexity.
    ev = invoke("eval", tiny_bert_dir, "--data", cls_data, "--max-length", "32", "--json")
    assert ev.exit_code == 0, ev.output
    row = json.loads(ev.stdout)["results"][0]
    assert row["task"] == "seq-cls" and "accuracy" in row and "perplexity" not in row


def test_float_labels_infer_regression(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "reg.jsonl", REG_ROWS)
    result = invoke("train", tiny_bert_dir, "--data", data, "--out", tmp_path / "r", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["task"] == "regression" and plan["task_inferred"] and plan["head_params"] == 64 + 1
    wrong = invoke(
        "train", tiny_bert_dir, "--data", data, "--out", tmp_path / "r", "--task", "seq-cls", "--dry-run"
    )
    assert wrong.exit_code == 3 and "use --task regression" in error_line(wrong)


def test_explicit_causal_lm_on_labelled_rows_is_refused(tiny_llama_dir, cls_data, lm_data, tmp_path):
    for args in (
        [
            "train",
            tiny_llama_dir,
            "--data",
            cls_data,
            "--task",
            "causal-lm",
            "--out",
            tmp_path / "r",
            *small(),
        ],
        ["eval", tiny_llama_dir, "--data", cls_data, "--task", "causal-lm"],
    ):
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        expected = (
            "cls.jsonl:1: the rows carry a 'label', which --task causal-lm would ignore; use --task seq-cls"
        )
        assert expected in error_line(result)
    no_labels = invoke(
        "train", tiny_llama_dir, "--data", lm_data, "--task", "seq-cls", "--out", tmp_path / "s"
    )
    assert no_labels.exit_code == 3 and "use --task causal-lm" in error_line(no_labels)


# ----------------------------------------------------------------------------- 2. run directory


def test_dry_run_reports_what_the_real_run_does(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "run"
    first = invoke(
        "train",
        tiny_llama_dir,
        "--data",
        lm_data,
        "--out",
        run,
        *small("--max-steps", "2", "--save-every", "1"),
    )
    assert first.exit_code == 0, first.output
    same = invoke(
        "train",
        tiny_llama_dir,
        "--data",
        lm_data,
        "--out",
        run,
        *small("--max-steps", "3"),
        "--dry-run",
        "--json",
    )
    assert same.exit_code == 0, same.output
    plan = json.loads(same.stdout)
    assert plan["start"] == "resume" and plan["resume"] == f"from {run / 'checkpoints' / 'step-2'} (step 2)"
    other = [*small("--max-steps", "3"), "--seed", "7"]
    planned = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *other, "--dry-run")
    real = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *other)
    assert planned.exit_code == real.exit_code == 3
    assert error_line(planned) == error_line(real)
    assert "other settings (seed); use another --out, or --force to replace that run" in error_line(real)
    never = invoke(
        "train",
        tiny_llama_dir,
        "--data",
        lm_data,
        "--out",
        run,
        *small("--max-steps", "3"),
        "--no-resume",
        "--dry-run",
    )
    assert never.exit_code == 3 and "replace it with --force" in error_line(never)


def test_force_replaces_only_what_train_wrote(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "run"
    assert (
        invoke(
            "train",
            tiny_llama_dir,
            "--data",
            lm_data,
            "--out",
            run,
            *small("--max-steps", "2", "--save-every", "1"),
        ).exit_code
        == 0
    )
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "README").write_text("mine too")
    elsewhere = tmp_path / "elsewhere-adapter"
    (run / "adapter").rename(elsewhere)
    (run / "adapter").symlink_to(elsewhere)  # a link out of the run directory is never followed
    other = [*small("--max-steps", "1"), "--seed", "7"]
    planned = invoke(
        "train", tiny_llama_dir, "--data", lm_data, "--out", run, *other, "--force", "--dry-run", "--json"
    )
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["start"] == "fresh" and plan["resume"] is None
    assert plan["replaces"] == [
        "checkpoints/step-1",
        "checkpoints/step-2",
        "config.yaml",
        "loss.png",
        "metrics.jsonl",
    ]
    assert (run / "checkpoints" / "step-2").is_dir()  # a dry run removes nothing
    result = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *other, "--force", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from"] is None
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # a new run: the old rows are gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["README", "step-1"]
    assert (run / "notes.txt").read_text() == "mine" and load_adapter(elsewhere).config.rank == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 7
    both = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *other, "--force", "--resume")
    assert both.exit_code == 2 and "pass one of them" in error_line(both)


def test_force_refuses_a_directory_that_is_not_a_run(tiny_llama_dir, lm_data, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own settings\n")
    (folder / "metrics.jsonl").write_text("{}\n")
    result = invoke(
        "train", tiny_llama_dir, "--data", lm_data, "--out", folder, *small("--max-steps", "1"), "--force"
    )
    assert result.exit_code == 3 and "is not a loraxs run directory" in error_line(result)
    assert (folder / "config.yaml").read_text() == "my: own settings\n" and (
        folder / "metrics.jsonl"
    ).exists()


# ----------------------------------------------------------------------------- 3. missing factors


def test_missing_factors_exit_3_with_the_command_that_recomputes_them(
    tiny_llama_dir, lm_data, tmp_path, loraxs_home
):
    run = tmp_path / "run"
    assert (
        invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *small("--max-steps", "2")).exit_code
        == 0
    )
    adapter = run / "adapter"
    measure = ["eval", tiny_llama_dir, "-a", adapter, "--data", lm_data, "--max-length", "32", "--json"]
    before = json.loads(invoke(*measure).stdout)["results"][0]["loss"]
    entry = load_adapter(adapter).config.factors["id"]
    assert invoke("cache", "rm", entry, "-y").exit_code == 0
    result = invoke(*measure)
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert f"factors {entry} of adapter {adapter} are not in the cache (LORAXS_HOME={loraxs_home})" in line
    assert "saved with --embed-factors" in line and "another base" not in line
    command = re.search(r"run `([^`]+)` to recompute them", line).group(1)
    words = shlex.split(command)
    assert words[:2] == ["loraxs", "init"]
    assert invoke(*words[1:]).exit_code == 0  # the printed command restores the very same factor set
    again = invoke(*measure)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["results"][0]["loss"] == pytest.approx(before, rel=1e-6)


# ----------------------------------------------------------------------------- 4. config.yaml


def test_config_yaml_round_trips(tiny_bert_dir, cls_data, tmp_path):
    first = tmp_path / "first"
    args = small(
        "--max-steps", "2", "--lr", "5e-3", "--eval-data", cls_data, "--seed", "3", "--warmup-ratio", "0.5"
    )
    assert invoke("train", tiny_bert_dir, "--data", cls_data, "--out", first, *args).exit_code == 0
    again = tmp_path / "again"
    # MODEL, --data and every setting come from the file; only --out is given.
    result = invoke("train", "--config", first / "config.yaml", "--out", again, "--json")
    assert result.exit_code == 0, result.output
    a, b = (yaml.safe_load((d / "config.yaml").read_text()) for d in (first, again))
    assert b.pop("out") == str(again) and a.pop("out") == str(first)
    assert a == b and a["lr"] == 5e-3 and a["task"] == "seq-cls" and a["seed"] == 3
    ra, rb = (load_file(d / "adapter" / "adapter.safetensors") for d in (first, again))
    assert ra.keys() == rb.keys() and all((ra[k] == rb[k]).all() for k in ra)


@pytest.mark.parametrize(
    ("setting", "hint"),
    [
        ("learning_rate: 0.1", "unknown setting 'learning_rate'; use 'lr'"),
        ("per_device_train_batch_size: 2", "use 'batch-size'"),
        ("num_train_epochs: 2", "use 'epochs'"),
        ("gradient_accumulation_steps: 2", "use 'grad-accum'"),
        ("lora_r: 8", "use 'rank'"),
        ("r: 8", "use 'rank'"),
        ("lora_alpha: 16", "use 'alpha'"),
        ("target_modules: [q_proj]", "use 'targets'"),
        ("warmup_steps: 10", "use 'warmup-ratio' (a share of the steps"),
        ("max_step: 3", "did you mean 'max-steps'?"),
    ],
)
def test_config_names_of_other_tools_get_a_hint(tiny_llama_dir, lm_data, tmp_path, setting, hint):
    config = tmp_path / "hf.yaml"
    config.write_text(setting + "\n")
    result = invoke("train", tiny_llama_dir, "--data", lm_data, "--config", config, "--out", tmp_path / "r")
    assert result.exit_code == 2 and hint in result.output


# ----------------------------------------------------------------------------- 5. best/ on ties


@pytest.mark.parametrize(("losses", "best_step"), [([0.9, 0.4, 0.6], 2), ([0.5, 0.5, 0.5], 3)])
def test_best_on_tied_metric_prefers_lower_loss_then_later_step(
    tiny_bert_dir, cls_data, tmp_path, monkeypatch, losses, best_step
):
    import loraxs_cli.train.recipe as train_module  # the module that calls evaluate_examples

    scripted = iter(losses)

    def evaluate(*args, **kwargs):  # the same accuracy at every evaluation, a scripted loss
        return {"loss": next(scripted), "examples": 12, "accuracy": 0.5, "macro_f1": 0.5, "mcc": 0.0}

    monkeypatch.setattr(train_module, "evaluate_examples", evaluate)
    run = tmp_path / "run"
    extra = small("--max-steps", "3", "--eval-every", "1", "--eval-data", cls_data, "--json")
    result = invoke("train", tiny_bert_dir, "--data", cls_data, "--out", run, *extra)
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["best_metric"]
    assert best["step"] == best_step and best["metrics"]["loss"] == min(losses)
    kept = load_adapter(run / "best").config.extra["metrics"]
    assert kept["steps"] == best_step and kept["eval_loss"] == min(losses)


# ----------------------------------------------------------------------------- 6. model card


def test_model_card_names_its_losses_base_and_data(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        tiny_llama_dir,
        "--data",
        lm_data,
        "--out",
        run,
        *small("--max-steps", "2", "--eval-data", lm_data),
    )
    assert result.exit_code == 0, result.output
    card = (run / "adapter" / "README.md").read_text()
    assert str(tiny_llama_dir) not in card and str(tiny_llama_dir.parent) not in card
    assert "base_model" not in card.split("\n---\n")[0]  # no hub id is known: none, never a path
    assert f"- base model: {tiny_llama_dir.name} (a local model" in card
    assert "final_loss" not in card and "{'" not in card
    assert re.search(r"^\| train_loss \| [\d.]+ \| training loss of the last step \|$", card, re.M)
    assert re.search(r"^\| eval_loss \| [\d.]+ \| loss on the held-out data \|$", card, re.M)
    sha = load_adapter(run / "adapter").config.extra["data"]["sha256"][:12]
    assert f"- training data: lm.jsonl (sha256 {sha}), 12 rows trained on; evaluated on lm.jsonl" in card


def test_model_card_names_a_hub_base_by_its_repo_id(tiny_llama_dir, lm_data, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from test_models import hub_snapshot

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    snapshot = hub_snapshot(home, tiny_llama_dir, repo_id="org/tiny")
    run = tmp_path / "run"
    assert (
        invoke("train", "org/tiny", "--data", lm_data, "--out", run, *small("--max-steps", "1")).exit_code
        == 0
    )
    card = (run / "adapter" / "README.md").read_text()
    assert "base_model: org/tiny\n" in card and "(Hugging Face Hub)" in card and str(snapshot) not in card
