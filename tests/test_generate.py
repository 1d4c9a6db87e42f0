"""`loraxs generate` (each prompt row names its adapter) and `loraxs eval` with several adapters in
one batched pass: the same numbers and texts as running each adapter alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli.adapter import apply_adapter, load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.evaluate import generate_texts
from loraxs_cli.layer import remove
from loraxs_cli.models import backbone, load_model, load_tokenizer, resolve_model
from models_for_tests import make_adapter

runner = CliRunner()
ARITHMETIC = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(4) for b in range(3)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-adapters")  # embedded factors: the cache is per test
    return [  # R ~ N(0, 1): strong enough to change the random model's greedy text
        make_adapter(tiny_llama_dir, root / "alice", seed=1, r_std=1.0, embed_factors=True),
        make_adapter(tiny_llama_dir, root / "bob", seed=2, r_std=1.0, alpha=8.0, embed_factors=True),
    ]


def eval_rows(*args) -> list[dict]:
    result = invoke("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def test_eval_several_adapters_in_one_pass_matches_each_alone(
    tiny_llama_dir, adapters, tmp_path, monkeypatch
):
    import loraxs_cli.evaluate as evaluate

    calls = []
    original = evaluate.evaluate_stacked
    monkeypatch.setattr(evaluate, "evaluate_stacked", lambda *a, **k: calls.append(1) or original(*a, **k))
    data = write_jsonl(tmp_path / "eval.jsonl", ARITHMETIC)
    together = eval_rows(tiny_llama_dir, "--data", data, "-a", adapters[0], "-a", adapters[1], "-b", "8")
    assert calls == [1]  # one batched pass for both adapters
    alone = [eval_rows(tiny_llama_dir, "--data", data, "-a", a, "-b", "8")[0] for a in adapters]
    assert [r["adapter"] for r in together] == [str(a) for a in adapters]
    for got, want in zip(together, alone, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["tokens"] == want["tokens"] and got["examples"] == want["examples"] == len(ARITHMETIC)
    assert abs(together[0]["loss"] - together[1]["loss"]) > 1e-3


def test_eval_several_classifiers_with_heads_in_one_pass(tiny_bert_dir, tmp_path):
    rows = [
        {"text": f"item {i} {'good' if i % 2 else 'bad'}", "label": ["neg", "pos"][i % 2]} for i in range(10)
    ]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    dirs = [
        make_adapter(tiny_bert_dir, tmp_path / f"cls{s}", task="seq-cls", labels=["neg", "pos"], seed=s)
        for s in (1, 2)
    ]
    together = eval_rows(tiny_bert_dir, "--data", data, "-a", dirs[0], "-a", dirs[1], "--max-length", "16")
    for got, adapter in zip(together, dirs, strict=True):
        want = eval_rows(tiny_bert_dir, "--data", data, "-a", adapter, "--max-length", "16")[0]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["accuracy"] == want["accuracy"] and got["mcc"] == pytest.approx(want["mcc"])


def test_eval_generate_with_several_adapters(tiny_llama_dir, adapters, tmp_path):
    data = write_jsonl(tmp_path / "gen.jsonl", ARITHMETIC[:4])
    common = ("--data", data, "--generate", "--max-new-tokens", "4", "-b", "1")
    together = eval_rows(tiny_llama_dir, *common, "-a", adapters[0], "-a", adapters[1])
    for got, adapter in zip(together, adapters, strict=True):
        want = eval_rows(tiny_llama_dir, *common, "-a", adapter)[0]
        assert got["samples"] == want["samples"] and got["exact_match"] == want["exact_match"]


_LOADED: dict = {}


def _alone_texts(model_dir, adapter_dir, prompts, batch_size, max_new_tokens=5):
    if model_dir not in _LOADED:  # load once: every use removes what it applied
        resolved = resolve_model(str(model_dir))
        _LOADED[model_dir] = load_model(resolved, head="causal-lm"), load_tokenizer(resolved)
    model, tokenizer = _LOADED[model_dir]
    if adapter_dir is not None:
        apply_adapter(model, load_adapter(adapter_dir))
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if adapter_dir is not None:
        remove(backbone(model))
    return texts


def test_generate_rows_with_different_adapters_match_each_alone(tiny_llama_dir, adapters, tmp_path):
    names = ["alice", "bob", None]
    rows = [{"adapter": names[i % 3], "prompt": r["prompt"]} for i, r in enumerate(ARITHMETIC[:9])]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    result = invoke(
        "generate", tiny_llama_dir, "--prompts", prompts, "-a", adapters[0], "-a", f"bob={adapters[1]}",
        "--max-new-tokens", "5", "-b", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["row"] for r in out) == list(range(9))
    by_row = {r["row"]: r for r in out}
    texts = [r["prompt"] for r in rows]
    for name, adapter_dir in zip(names, [*adapters, None], strict=True):
        # Same prompts, same batching, one adapter for all rows: the rows naming it must agree.
        want = _alone_texts(tiny_llama_dir, adapter_dir, texts, batch_size=4)
        for i, row in enumerate(rows):
            if row["adapter"] == name:
                assert by_row[i]["adapter"] == name and by_row[i]["output"] == want[i]
    assert len({by_row[i]["output"] for i in range(3)} | {by_row[i]["output"] for i in range(3, 6)}) > 1


def test_generate_sampling_is_reproducible_and_streams_to_a_file(tiny_llama_dir, adapters, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": "alice", "prompt": "1 plus 1 is"}] * 3)
    outputs = []
    for attempt in range(2):
        target = tmp_path / f"out{attempt}.jsonl"
        result = invoke(
            "generate", tiny_llama_dir, "-p", prompts, "-a", adapters[0], "--temperature", "1.5",
            "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "6", "--out", target, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["rows"] == 3
        outputs.append([json.loads(line)["output"] for line in target.read_text().splitlines()])
    assert outputs[0] == outputs[1]


def test_generate_in_a_real_process_groups_factor_sets(tiny_llama_dir, adapters, tmp_path):
    """An adapter of another factor set on the same base runs in its own group, not mixed."""
    other = make_adapter(tiny_llama_dir, tmp_path / "qonly", targets="q_proj", rank=8, embed_factors=True)
    rows = [{"adapter": "alice", "prompt": "2 plus 2 is"}, {"adapter": "qonly", "prompt": "2 plus 2 is"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    command = [sys.executable, "-m", "loraxs_cli", "generate", str(tiny_llama_dir), "-p", str(prompts),
               "-a", str(adapters[0]), "-a", str(other), "--max-new-tokens", "3"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = {json.loads(line)["adapter"]: json.loads(line)["output"] for line in done.stdout.splitlines()}
    assert out["alice"] == _alone_texts(tiny_llama_dir, adapters[0], ["2 plus 2 is"], 1, 3)[0]
    assert out["qonly"] == _alone_texts(tiny_llama_dir, other, ["2 plus 2 is"], 1, 3)[0]


@pytest.mark.parametrize(
    "rows, extra, code, message",
    [
        ([{"adapter": "carol", "prompt": "x"}], (), 3, "p.jsonl:1: adapter 'carol' was not loaded"),
        ([{"adapter": 5, "prompt": "x"}], (), 3, "'adapter' must be a name or null"),
        ([{"adapter": None, "text": "x"}], (), 3, "p.jsonl:1"),
        ([{"adapter": None, "prompt": "x"}], ("--temperature", "-1"), 2, "--temperature must be >= 0"),
        ([{"adapter": None, "prompt": "x"}], ("--batch-size", "0"), 2, "must be positive"),
    ],
)
def test_generate_bad_input(tiny_llama_dir, adapters, tmp_path, rows, extra, code, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    result = invoke("generate", tiny_llama_dir, "-p", prompts, "-a", adapters[0], *extra)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_generate_refuses_duplicate_names_and_other_bases(tiny_llama_dir, tiny_gpt2_dir, adapters, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": None, "prompt": "x"}])
    result = invoke(
        "generate", tiny_llama_dir, "-p", prompts, "-a", f"x={adapters[0]}", "-a", f"x={adapters[1]}"
    )
    assert result.exit_code == 2 and "two adapters are named 'x'" in result.output
    gpt2 = make_adapter(tiny_gpt2_dir, tmp_path / "gpt2")
    result = invoke("generate", tiny_llama_dir, "-p", prompts, "-a", gpt2)
    assert result.exit_code == 4 and "was trained on base" in result.output


def test_no_adapter_rows_alone_equal_base_generation(tiny_llama_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": None, "prompt": "3 plus 1 is"}])
    result = invoke("generate", tiny_llama_dir, "-p", prompts, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)
    assert json.loads(result.stdout)["output"] == _alone_texts(tiny_llama_dir, None, ["3 plus 1 is"], 1, 4)[0]
