"""The run directory and the process around `train`: the dry-run's held-out split is the run's, one
`train` per run directory (a lock), SIGTERM handled like Ctrl-C, --out never over an input, and
config.yaml read back into the same settings (the typed LoRA-SB section included)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from hardening_util import Watched, wait_for
from typer.testing import CliRunner

from loraxs_cli.adapter import load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.data import read_rows
from loraxs_cli.errors import UsageError
from loraxs_cli.train import (
    RunDir,
    SBConfig,
    TrainConfig,
    checkpoint_dirs,
    config_from_document,
    settings_document,
    split_rows,
)
from loraxs_cli.train.run_dir import LOCK_FILE

runner = CliRunner()

CLS_ROWS = [
    {"text": f"item {i} {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(24)
]
LM_ROWS = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(4) for b in range(3)]
SMALL = ["--rank", "4", "--batch-size", "4", "--max-length", "32", "--log-every", "1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cls_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)


@pytest.fixture
def lm_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "lm.jsonl", LM_ROWS)


# ----------------------------------------------------------------------------- the held-out split


def test_dry_run_counts_the_held_out_rows_the_run_holds_out(tiny_bert_dir, cls_data, tmp_path):
    """24 rows at --eval-split 0.1: sklearn holds out ceil(2.4) = 3; the plan said int(2.4) = 2."""
    config = TrainConfig(
        model=str(tiny_bert_dir), data=str(cls_data), out="x", task="seq-cls", eval_split=0.1
    )
    train_rows, held_rows = split_rows(config, read_rows(cls_data))
    assert (len(train_rows), len(held_rows)) == (21, 3)
    run = tmp_path / "run"
    args = ["train", tiny_bert_dir, "--data", cls_data, "--out", run, "--eval-split", "0.1", *SMALL]
    plan = invoke(*args, "--dry-run", "--no-measure", "--json")
    assert plan.exit_code == 0, plan.output
    planned = json.loads(plan.stdout)
    assert (planned["train_examples"], planned["eval_examples"]) == (21, 3)
    result = invoke(*args, "--max-steps", "1", "--json")
    assert result.exit_code == 0, result.output
    data = load_adapter(run / "adapter").config.extra["data"]
    assert (data["examples"], data["eval_examples"]) == (21, 3)


# ----------------------------------------------------------------------------- one train per --out


def test_a_second_train_on_a_locked_run_directory_refuses_with_one_line(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    args = ["train", tiny_llama_dir, "--data", lm_data, "--out", run, *SMALL, "--max-steps", "2"]
    with FileLock(str(run / LOCK_FILE), timeout=0):  # what a running `train` holds
        result = invoke(*args)
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1
        and "in use by another `loraxs train`" in lines[0]
        and "Traceback" not in result.output
    )
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing of a run written
    # Released (the holder finished or was killed): the lock file left behind does not block.
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    assert (run / "adapter").is_dir()


def test_the_lock_of_a_killed_process_does_not_block(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, filelock; lock = filelock.FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); time.sleep(600)", str(run / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *SMALL, "--max-steps", "1")
        assert busy.exit_code == 3 and "in use" in busy.output
    finally:
        holder.kill()
        holder.wait()
    result = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *SMALL, "--max-steps", "1")
    assert result.exit_code == 0, result.output


def test_a_run_refused_before_training_leaves_no_directory(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "new"
    result = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", run, *SMALL, "--resume")
    assert result.exit_code == 3 and "no checkpoint" in result.output
    assert not run.exists()


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_writes_a_checkpoint_and_exits_like_ctrl_c(tiny_llama_dir, lm_data, tmp_path, loraxs_home):
    """A real process: SIGTERM (a scheduler's preemption) mid-training checkpoints the step it reached
    and exits 130 with the one line Ctrl-C gives."""
    run = tmp_path / "run"
    args = ["train", tiny_llama_dir, "--data", lm_data, "--out", run, *SMALL, "--max-steps", "100000",
            "--save-every", "100000"]  # fmt: skip
    child = Watched(args, loraxs_home)
    metrics = run / "metrics.jsonl"

    def logged() -> int:
        try:
            return len(metrics.read_text().splitlines())
        except OSError:
            return 0

    try:
        assert wait_for(lambda: logged() >= 2 or child.proc.poll() is not None, 120), "no training step"
        assert child.proc.poll() is None, child.lines
        child.proc.send_signal(signal.SIGTERM)
        code = child.proc.wait(60)
    finally:
        if child.proc.poll() is None:
            child.kill()
    time.sleep(0.1)  # the reader threads drain the last lines
    stderr = "".join(child.lines)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stderr
    saved = checkpoint_dirs(run)
    assert len(saved) == 1
    step = int(saved[0].name.removeprefix("step-"))
    assert step >= 2 and not (run / "adapter").exists()


# ----------------------------------------------------------------------------- --out over an input


def test_train_out_over_an_input_is_refused_before_anything_is_written(
    tiny_llama_dir, lm_data, tmp_path, loraxs_home
):
    before = lm_data.read_bytes()
    (loraxs_home / "factors").mkdir(parents=True, exist_ok=True)
    cases = {
        lm_data: "is the data",
        tiny_llama_dir / "run": "lies inside the model",
        tmp_path: "contains the data",
        loraxs_home / "factors" / "run": "lies inside the factor cache",
    }
    for out, relation in cases.items():
        for extra in ([], ["--dry-run", "--no-measure"]):
            result = invoke("train", tiny_llama_dir, "--data", lm_data, "--out", out, *SMALL, *extra)
            assert result.exit_code == 3, (out, result.output)
            assert relation in result.output and "Traceback" not in result.output
    assert lm_data.read_bytes() == before
    assert not (tiny_llama_dir / "run").exists() and not (loraxs_home / "factors" / "run").exists()


# ----------------------------------------------------------------------------- config.yaml


def test_config_yaml_reads_back_into_the_same_settings(tiny_llama_dir, lm_data, tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "train",
        tiny_llama_dir,
        "--data",
        lm_data,
        "--out",
        run,
        *SMALL,
        "--max-steps",
        "1",
        "--sb-samples",
        "9",
    )
    assert result.exit_code == 0, result.output
    config = RunDir(run).read_config()
    assert config.sb == SBConfig(samples=9) and config.rank == 4 and config.task == "causal-lm"
    assert settings_document(config) == {
        k: v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items() if k != "recorded"
    }


def test_the_sb_section_is_typed_and_old_documents_still_load():
    config = TrainConfig(model="m", data="d", out="o", method="sb", sb={"samples": 8, "eta": None})
    assert isinstance(config.sb, SBConfig) and config.sb.samples == 8 and config.sb.eta == SBConfig().eta
    with pytest.raises(UsageError, match="unknown LoRA-SB setting"):
        TrainConfig(model="m", data="d", out="o", sb={"sample": 8})
    document = settings_document(config)
    assert document["sb_samples"] == 8 and document["sb_lr"] == SBConfig().eta and "sb" not in document
    assert config_from_document(document) == config
    # A document of an older version: options spelled with '-', some missing, `recorded` and unknown skipped.
    old = {
        "model": "m",
        "data": "d",
        "out": "o",
        "max-steps": 3,
        "sb-samples": 16,
        "recorded": {"x": 1},
        "gone": 1,
    }
    loaded = config_from_document(old)
    assert loaded.max_steps == 3 and loaded.sb == SBConfig(samples=16)
