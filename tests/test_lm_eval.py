"""`loraxs eval --lm-eval`: lm-evaluation-harness on a local YAML multiple-choice task gives the
accuracy (and acc_norm) of a direct log-likelihood computation of the same rows, for the base and for
each of several adapters; the refusals are one line."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli.adapter import apply_adapter, load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.layer import remove
from loraxs_cli.models import backbone, load_model, load_tokenizer, resolve_model
from models_for_tests import make_adapter

pytest.importorskip("lm_eval")

runner = CliRunner()
TASK = "loraxs_tiny_mc"
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def mc_rows(n: int = 20) -> list[dict]:
    """Sums in words with four choices, the answer at a seeded position."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        x, y = rng.randrange(5), rng.randrange(5)
        answer = WORDS[x + y]
        choices = [*rng.sample([w for w in WORDS if w != answer], 3), answer]
        rng.shuffle(choices)
        question = f"What is {WORDS[x]} plus {WORDS[y]}? Answer:"
        rows.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return rows


@pytest.fixture
def task_dir(tmp_path, monkeypatch) -> Path:
    """A directory with one lm-eval YAML task on a local jsonl file (datasets' json builder), and the
    `datasets` cache and offline switch pointed at a temporary place (datasets reads its environment
    when imported, so its config is set too)."""
    import datasets

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    root = tmp_path / "tasks"
    root.mkdir()
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in mc_rows()))
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm")
    )
    (root / "mc.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        f"metric_list:\n{metrics}"
    )
    return root


@pytest.fixture
def captured(monkeypatch) -> list[dict]:
    """lm-eval's own per-document results of every simple_evaluate call (the command asks for none)."""
    import lm_eval.evaluator

    calls: list[dict] = []
    original = lm_eval.evaluator.simple_evaluate

    def spy(*args, **kwargs):
        result = original(*args, **{**kwargs, "log_samples": True})
        calls.append(result)
        return result

    monkeypatch.setattr(lm_eval.evaluator, "simple_evaluate", spy)
    return calls


def lm_eval_rows(*args) -> list[dict]:
    result = runner.invoke(app, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


@torch.no_grad()
def direct_loglikelihoods(model, tokenizer, rows) -> list[list[float]]:
    """Per row, per choice: the sum of log-probabilities of the continuation ' CHOICE' given the
    question, from one plain forward pass of the model."""
    out = []
    for row in rows:
        context = tokenizer(row["question"]).input_ids
        scores = []
        for choice in row["choices"]:
            continuation = tokenizer(" " + choice, add_special_tokens=False).input_ids
            logits = model(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
            scores.append(float(logits[positions, torch.tensor(continuation)].sum()))
        out.append(scores)
    return out


def accuracies(loglikelihoods, rows) -> tuple[float, float]:
    """lm-eval's acc and acc_norm (the log-likelihood over the choice's length in characters)."""
    acc = norm = 0
    for scores, row in zip(loglikelihoods, rows, strict=True):
        acc += max(range(len(scores)), key=scores.__getitem__) == row["label"]
        normed = [s / len(c) for s, c in zip(scores, row["choices"], strict=True)]
        norm += max(range(len(normed)), key=normed.__getitem__) == row["label"]
    return acc / len(rows), norm / len(rows)


def test_lm_eval_equals_a_direct_loglikelihood_computation(tiny_llama_dir, task_dir, captured, tmp_path):
    adapters = [  # R ~ N(0, 1): strong enough to move the random model's choices
        make_adapter(tiny_llama_dir, tmp_path / "alice", seed=1, r_std=1.0, embed_factors=True),
        make_adapter(tiny_llama_dir, tmp_path / "bob", seed=2, r_std=1.0, alpha=8.0, embed_factors=True),
    ]
    include = ("--lm-eval", TASK, "--lm-eval-include", task_dir, "-b", "8")
    several = lm_eval_rows(tiny_llama_dir, *include, "-a", adapters[0], "-a", adapters[1])
    base = lm_eval_rows(tiny_llama_dir, *include)
    assert [r["adapter"] for r in several + base] == [str(adapters[0]), str(adapters[1]), None]
    assert {r["task"] for r in several + base} == {TASK}
    assert len(captured) == 3  # one lm-eval run per adapter, then the base alone

    rows = mc_rows()
    resolved = resolve_model(str(tiny_llama_dir))
    model, tokenizer = load_model(resolved, head="causal-lm").eval(), load_tokenizer(resolved)
    direct = []
    for adapter in [*adapters, None]:
        if adapter is not None:
            apply_adapter(model, load_adapter(adapter))
        direct.append(direct_loglikelihoods(model, tokenizer, rows))
        if adapter is not None:
            remove(backbone(model))
    for row, run, want in zip(several + base, captured, direct, strict=True):
        samples = sorted(run["samples"][TASK], key=lambda s: s["doc_id"])
        got = [[float(resp[0][0]) for resp in sample["resps"]] for sample in samples]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)
        acc, acc_norm = accuracies(want, rows)
        assert row["examples"] == len(rows) and row["num_fewshot"] == 0
        assert (row["acc"], row["acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-12)
        assert row["acc_stderr"] == pytest.approx((acc * (1 - acc) / (len(rows) - 1)) ** 0.5)
    # The adapters are really applied: their log-likelihoods are not the base's.
    assert all((torch.tensor(d) - torch.tensor(direct[2])).abs().max() > 0.05 for d in direct[:2])
    # Nothing went to the user's datasets cache: the json builder's copy is in the test's one.
    assert any((tmp_path / "hf" / "datasets").rglob("*.arrow"))


def test_lm_eval_refusals(tiny_llama_dir, task_dir, monkeypatch):
    from lm_eval.tasks import TaskManager

    from loraxs_cli.errors import UsageError
    from loraxs_cli.lm_eval_bridge import resolve_tasks

    def refused(*args) -> str:
        result = runner.invoke(app, ["eval", str(tiny_llama_dir), *map(str, args)])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    assert "--data EVAL" in refused()
    assert "drop --data" in refused("--lm-eval", TASK, "--data", task_dir / "mc.jsonl")
    assert "drop --generate" in refused("--lm-eval", TASK, "--generate")
    # An unknown name, against lm-eval's own index of the include directory: the close names.
    local = TaskManager(include_path=str(task_dir), include_defaults=False)
    close = f"unknown lm-eval task 'loraxs_tiny_mq' \\(did you mean {TASK}\\?\\)"
    with pytest.raises(UsageError, match=close):
        resolve_tasks(local, ["loraxs_tiny_mq"])
    assert resolve_tasks(local, ["loraxs_tiny_*"]) == [TASK]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    assert "pip install 'loraxs[lm-eval]'" in refused("--lm-eval", TASK)
