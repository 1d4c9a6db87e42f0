"""`--lr auto`: the LR range test (lr_finder.py) on tiny models: its rule on known curves, the exact
restore of everything it touches, and its record in config.yaml, metrics.jsonl and the CLI output."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.lr_finder import LRFindSettings, choose, lr_range_test, schedule, smooth, suggestions
from loraxs_cli.train import TrainConfig, train

runner = CliRunner()
ARITHMETIC = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(6) for b in range(4)]
REVIEWS = [{"text": f"{w} {w} film number {i}", "label": lab} for i in range(12)
           for w, lab in (("great", "pos"), ("awful", "neg"))]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config_for(model: Path, data: str, out: Path, **overrides) -> TrainConfig:
    settings = dict(model=str(model), data=data, out=str(out), rank=4, batch_size=4, max_length=32,
                    max_steps=3, save_every=0, log_every=1, lr_find_steps=20)  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# The rule


def test_schedule_is_exponential_from_min_to_max():
    settings = LRFindSettings(min_lr=1e-4, max_lr=1.0, steps=21)
    lrs = schedule(settings)
    assert len(lrs) == 21 and lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert max(ratios) == pytest.approx(min(ratios))


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards zero
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_rules_on_a_known_curve():
    """A loss flat up to 1e-3, falling fastest at 1e-2 (in log lr), lowest near 0.1, then blowing up."""
    settings = LRFindSettings(min_lr=1e-5, max_lr=1.0, steps=51, skip_begin=5)
    lrs = schedule(settings)
    curve = [2.0 - math.tanh(2 * (math.log10(lr) + 2)) + (20 * lr) ** 2 for lr in lrs]
    found = suggestions(lrs, curve, settings)
    assert 7e-3 < found["steepest"] < 1.5e-2, found
    lowest = lrs[min(range(len(lrs)), key=curve.__getitem__)]
    assert found["min/10"] == pytest.approx(lowest / 10)
    # The valley: the whole falling stretch after the skipped points (1e-5 .. lowest), half-way in log lr.
    assert found["valley"] == pytest.approx(math.sqrt(lrs[5] * lowest), rel=0.3), found
    assert choose(found, settings) == (found["valley"], "valley")


def test_noise_before_the_descent_does_not_move_the_valley():
    """Batch-to-batch noise on a flat start (a language model's per-batch losses) fools the steepest-
    descent rule; the valley is the long fall that follows."""
    settings = LRFindSettings(min_lr=1e-5, max_lr=1.0, steps=50, skip_begin=5)
    lrs = schedule(settings)
    jitter = [0.3 * math.sin(7.0 * i) for i in range(50)]
    curve = [4.0 - 0.5 * (1 + math.tanh(3 * (math.log10(lr) + 2.5))) + 10 * lr**2 + j * (lr < 1e-4)
             for lr, j in zip(lrs, jitter, strict=True)]  # fmt: skip
    found = suggestions(lrs, smooth(curve, 0.9), settings)
    assert 3e-4 < found["valley"] < 3e-2, found
    assert found["steepest"] < 1e-4  # a wiggle of the noisy start


def test_rules_fall_back_without_a_descent():
    settings = LRFindSettings(min_lr=1e-5, max_lr=1.0, steps=20, skip_begin=5)
    lrs = schedule(settings)
    rising = [1.0 + i for i in range(20)]
    found = suggestions(lrs, rising, settings)
    assert found["valley"] is None and found["steepest"] is None
    assert found["min/10"] == pytest.approx(max(lrs[5] / 10, settings.min_lr))
    assert choose(found, settings) == (found["min/10"], "min/10")
    assert choose(suggestions(lrs, [math.inf] * 20, settings), settings) == (settings.min_lr, "min_lr")


def test_range_test_restores_parameters_gradients_and_rng_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)  # a gradient already there is kept too
    before = [p.detach().clone() for p in params]
    grad_before = params[0].grad.clone()
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    rng = torch.get_rng_state()

    def step_loss(k: int) -> float:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return float(loss.detach())

    result = lr_range_test(
        params,
        lambda lr: torch.optim.AdamW(params, lr=lr),
        lambda opt, lr: opt.param_groups[0].__setitem__("lr", lr),
        step_loss,
        settings=LRFindSettings(steps=30),
    )
    for p, saved in zip(params, before, strict=True):
        assert torch.equal(p, saved)
    assert torch.equal(params[0].grad, grad_before) and params[1].grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert math.isfinite(result.lr) and 1e-5 <= result.lr <= 1.0
    assert len(result.lrs) == len(result.losses) == len(result.smoothed) <= 30
    assert result.stopped_early == (len(result.lrs) < 30)


def test_bad_range_settings_are_usage_errors():
    from loraxs_cli.errors import UsageError

    with pytest.raises(UsageError):
        LRFindSettings(min_lr=1.0, max_lr=1e-3).validate()
    with pytest.raises(UsageError):
        LRFindSettings(steps=4).validate()


# ----------------------------------------------------------------------------------------------
# In `train`


def test_auto_equals_training_with_the_chosen_lr(tiny_bert_dir, tmp_path):
    """The range test leaves no trace: --lr auto that picked X trains exactly as --lr X."""
    data = write_jsonl(tmp_path / "train.jsonl", REVIEWS)
    auto = train(config_for(tiny_bert_dir, data, tmp_path / "auto", task="seq-cls", lr="auto"))
    assert auto.lr_find is not None and auto.lr == auto.lr_find["lr"]
    assert 1e-5 <= auto.lr <= 1.0
    fixed = train(config_for(tiny_bert_dir, data, tmp_path / "fixed", task="seq-cls", lr=auto.lr))
    a = load_file(auto.adapter_dir / "adapter.safetensors")
    b = load_file(fixed.adapter_dir / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    recorded = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert recorded["lr"] == "auto"  # `--config` repeats the run with a fresh range test
    assert recorded["recorded"]["lr_find"]["lr"] == auto.lr
    assert recorded["recorded"]["lr_find"]["rule"] in ("valley", "min/10")
    assert set(recorded["recorded"]["lr_find"]["suggestions"]) == {"valley", "steepest", "min/10"}
    rows = metrics(tmp_path / "auto")
    finder = [r for r in rows if r.get("kind") == "lr_find"]
    assert len(finder) == 1 and finder[0]["step"] == 0
    curve = finder[0]["lr_find"]
    assert len(curve["lrs"]) == len(curve["losses"]) >= 12
    assert curve["lrs"] == sorted(curve["lrs"])
    assert all(r["lr"] <= auto.lr + 1e-12 for r in rows if "loss" in r)  # linear decay from the choice


def test_auto_on_resume_reuses_the_first_choice(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    out = tmp_path / "run"
    first = train(
        config_for(tiny_llama_dir, data, out, task="causal-lm", lr="auto", max_steps=2, save_every=1)
    )
    again = train(
        config_for(tiny_llama_dir, data, out, task="causal-lm", lr="auto", max_steps=4, save_every=1)
    )
    # max_steps is not part of the identity: the second call continues the first run from step 2
    assert again.resumed_from == 2 and again.lr == first.lr
    assert [r.get("kind") for r in metrics(out)].count("lr_find") == 1  # no second test


def test_cli_lr_auto_json_and_bad_values(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    args = ["train", str(tiny_llama_dir), "--data", data, "--rank", "4", "--batch-size", "4", "--max-length",
            "32", "--max-steps", "2", "--save-every", "0", "--lr-find-steps", "16"]  # fmt: skip
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--lr", "auto", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["lr_find"]["lr"] == doc["lr"] and doc["lr"] > 0
    for bad in ("fast", "-1", "0", "nan"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--lr", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert "--lr" in result.output
    assert not (tmp_path / "b").exists()


def test_torchrun_processes_agree_with_one(tiny_llama_dir, tmp_path):
    """gloo on CPU: 2 processes x batch 2 run the same range test as 1 process x batch 4 (gradients are
    averaged across processes), choose the same lr and train to the same R."""
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    common = ["train", str(tiny_llama_dir), "--data", data, "--rank", "4", "--max-steps", "3", "--max-length",
              "32", "--lr", "auto", "--lr-find-steps", "16", "--save-every", "0"]  # fmt: skip
    runs = {}
    for nproc, batch in ((1, "4"), (2, "2")):
        out = tmp_path / f"n{nproc}"
        port = str(29700 + os.getpid() % 500 + nproc)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", port, "-m", "loraxs_cli", *common, "--batch-size", batch,
                   "--out", str(out)]  # fmt: skip
        done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs[nproc] = yaml.safe_load((out / "config.yaml").read_text())["recorded"]["lr_find"]
    assert runs[1]["lr"] == pytest.approx(runs[2]["lr"], rel=1e-9)
    a, b = (load_file(tmp_path / f"n{n}" / "adapter" / "adapter.safetensors") for n in (1, 2))
    for key in a:  # gloo's sum in another order: Adam's g / sqrt(v) magnifies it where g is near 0
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
