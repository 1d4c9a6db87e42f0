"""Defaults that learn: per-task learning rates and warmup (train.DEFAULTS, from the sweep in
benchmarks/sweep_defaults.py), their record in config.yaml, `train --dry-run`'s measured time estimate,
and (real MiniLM) a run with no learning-rate flags that learns an imbalanced binary task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loraxs_cli.adapter import load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.train import DEFAULTS, TrainConfig, about, with_defaults

runner = CliRunner()
ARITHMETIC = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(6) for b in range(4)]
REVIEWS = [{"text": f"{w} {w} film number {i}", "label": lab} for i in range(6)
           for w, lab in (("great", "pos"), ("awful", "neg"))]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def small(*extra) -> list[str]:
    return ["--rank", "4", "--batch-size", "4", "--max-length", "32", "--save-every", "0", *extra]


@pytest.mark.parametrize(("task", "method"), sorted(DEFAULTS))
def test_unset_settings_take_the_task_and_method_defaults(task, method):
    config = with_defaults(TrainConfig(model="m", data="d", out="o", task=task, method=method))
    chosen = DEFAULTS[(task, method)]
    assert config.lr == chosen["lr"] and config.warmup_ratio == chosen["warmup_ratio"]
    assert config.head_lr == (None if task in ("causal-lm", "preference") else chosen["head_lr"])
    given = with_defaults(
        TrainConfig(
            model="m", data="d", out="o", task=task, method=method, lr=0.5, head_lr=0.25, warmup_ratio=0.0
        )
    )
    assert (given.lr, given.head_lr, given.warmup_ratio) == (0.5, 0.25, 0.0)  # what is given wins
    assert (
        with_defaults(TrainConfig(model="m", data="d", out="o", task=task, method=method, lr="auto")).lr
        == "auto"
    )


def test_classification_defaults_differ_from_the_old_shared_lr():
    """The old default (R and head at 1e-3) left a head that barely moved in a few hundred steps."""
    xs = DEFAULTS[("seq-cls", "xs")]
    assert xs["head_lr"] > 1e-3 and xs["lr"] >= 1e-3


def test_config_yaml_and_card_record_the_resolved_values(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    run = tmp_path / "run"
    result = invoke("train", tiny_bert_dir, "--data", data, "--out", run, *small("--max-steps", "1"))
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    chosen = DEFAULTS[("seq-cls", "xs")]
    assert saved["task"] == "seq-cls"
    assert (saved["lr"], saved["head_lr"], saved["warmup_ratio"]) == (
        chosen["lr"], chosen["head_lr"], chosen["warmup_ratio"],
    )  # fmt: skip
    training = load_adapter(run / "adapter").config.extra["training"]
    assert training["lr"] == chosen["lr"] and training["head_lr"] == chosen["head_lr"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--head-lr", "-1"), ("--warmup-ratio", "1.5"), ("--lr-find-steps", "3")],  # --head-lr 0: frozen head
)
def test_bad_learning_settings_are_usage_errors(tiny_bert_dir, tmp_path, flag, value):
    data = write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    extra = ["--lr", "auto"] if flag == "--lr-find-steps" else []
    result = invoke(
        "train", tiny_bert_dir, "--data", data, "--out", tmp_path / "run", *small(flag, value, *extra)
    )
    assert result.exit_code == 2, result.output
    assert flag in result.output or "lr-find-steps" in result.output
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# train --dry-run: the time estimate


def test_dry_run_estimates_the_time_from_a_measured_step(tiny_llama_dir, tmp_path, loraxs_home):
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    run = tmp_path / "run"
    args = ["train", tiny_llama_dir, "--data", data, "--out", run, *small("--max-steps", "40"), "--dry-run"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["step_seconds"] > 0 and plan["estimated_seconds"] > 0
    assert plan["estimated_seconds"] == pytest.approx(40 * plan["step_seconds"])
    assert plan["estimate"].startswith("about ") and plan["measured_on"] == "cpu"
    assert plan["lr"] == DEFAULTS[("causal-lm", "xs")]["lr"] and plan["head_lr"] is None
    assert not run.exists(), "a dry run writes no run directory"
    assert not (loraxs_home / "factors").exists() or not any((loraxs_home / "factors").iterdir())

    text = invoke(*args)
    assert text.exit_code == 0, text.output
    assert "time:       about" in text.stdout and "s per step" in text.stdout

    auto = json.loads(invoke(*args, "--lr", "auto", "--lr-find-steps", "20", "--json").stdout)
    assert auto["lr"] == "auto"
    assert auto["estimated_seconds"] == pytest.approx(60 * auto["step_seconds"])  # 40 steps + the test's 20

    quick = json.loads(invoke(*args, "--no-measure", "--json").stdout)
    assert "estimated_seconds" not in quick and quick["steps"] == 40


def test_about_reads_like_a_person_would_say_it():
    assert about(0.2) == "about 1 second"
    assert about(42) == "about 42 seconds"
    assert about(14 * 60 + 10) == "about 14 minutes"
    assert about(2.5 * 3600) == "about 2.5 hours"


# ----------------------------------------------------------------------------------------------
# Real weights: the defaults learn


@pytest.mark.real
@pytest.mark.slow
def test_minilm_defaults_learn_an_imbalanced_binary_task(minilm_path, tmp_path):
    """Only the required flags plus short texts and a step budget (no learning rates): BBC politics against
    business at 1:2, the case where the old defaults stayed at the majority class (0.667 here)."""
    from models_for_tests import bbc_examples

    rows = bbc_examples(0)
    politics = [r for r in rows if r["label"] == "politics"]
    business = [r for r in rows if r["label"] == "business"]
    train_rows = politics[:60] + business[:120]  # benchmarks/sweep_defaults.py's split, smaller
    held_rows = politics[60:90] + business[120:180]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    held = write_jsonl(tmp_path / "held.jsonl", held_rows)
    result = invoke("train", minilm_path, "--data", train, "--eval-data", held, "--out", tmp_path / "run",
                    "--max-length", "64", "--max-steps", "60", "--save-every", "0", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    majority = sum(r["label"] == "business" for r in held_rows) / len(held_rows)
    print(f"\nheld-out accuracy {doc['eval']['accuracy']:.3f} (majority {majority:.3f})")
    assert doc["eval"]["accuracy"] >= majority + 0.2, doc["eval"]


# ----------------------------------------------------------------------------------------------
# The sweep script


@pytest.mark.slow  # about a minute: 14 tiny runs in a subprocess
def test_sweep_script_runs_every_phase_in_quick_mode(tiny_bert_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "sweep"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_defaults.py"
    command = [sys.executable, str(script), "--quick", "--out", str(out), "--minilm", str(tiny_bert_dir),
               "--smollm2", str(tiny_llama_dir), "--tasks", "binary", "word"]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    phases = {(r["setting"]["task"], r["setting"]["phase"]) for r in rows}
    expected = {(t, p) for t in ("binary", "word") for p in ("grid", "refine", "auto")}
    assert phases == expected | {("word", "base"), ("binary", "check")}
    assert all("metric" in r for r in rows), [r.get("error") for r in rows]
    auto = [r for r in rows if r["setting"]["phase"] == "auto"]
    assert all(r["lr_find"]["lr"] > 0 and len(r["lr_find"]["lrs"]) >= 12 for r in auto)
    assert any(r["setting"]["method"] == "sb" for r in rows)
    table = (out / "table.md").read_text()
    assert "## binary" in table and "## word" in table and "auto ->" in table
    # a rerun finds every run done and only rewrites the table
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len((out / "results.jsonl").read_text().splitlines()) == len(rows)
