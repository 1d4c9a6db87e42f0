"""LoRA-XS learns on real weights, through the CLI: MiniLM classifies BBC topics, SmolLM2 models BBC
text, and SmolLM2-Instruct answers arithmetic word problems better than before training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from models_for_tests import MINILM_TOPICS

pytestmark = [pytest.mark.real, pytest.mark.slow]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def loraxs_json(*args) -> dict:
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def train_then_eval(model: Path, train: str, test: str, out: Path, *train_args, eval_args=()) -> tuple:
    """(base scores, trained scores, train result) on the held-out file."""
    base = loraxs_json("eval", model, "--data", test, *eval_args)
    trained_run = loraxs_json("train", model, "--data", train, "--out", out, "--save-every", 0, *train_args)
    after = loraxs_json("eval", model, "--adapter", out / "adapter", "--data", test, *eval_args)
    print(f"\nbase {base['results'][0]}\ntrained {after['results'][0]}")
    return base["results"][0], after["results"][0], trained_run


@pytest.mark.xdist_group("minilm-topics")
def test_minilm_classifies_bbc_topics_with_few_parameters(minilm_path, bbc_topics, minilm_topics_xs,
                                                         in_real_home):  # fmt: skip
    """BBC News, 5 topics, 40 articles per topic to train on, 20 held out: >= 0.90 accuracy with fewer
    than 20k trainable numbers (measured: 0.93 with 3,461: 6 x 4 x 64 in R, 1,925 in the head; 64 tokens)."""
    run, test = minilm_topics_xs, bbc_topics[1]
    base = loraxs_json("eval", minilm_path, "--data", test, *MINILM_TOPICS)["results"][0]
    after = loraxs_json("eval", minilm_path, "--adapter", run["out"] / "adapter", "--data", test,
                        *MINILM_TOPICS)["results"][0]  # fmt: skip
    print(f"\nbase {base}\ntrained {after}")
    assert run["adapter_params"] + run["head_params"] < 20_000
    assert after["accuracy"] >= 0.90, (base, after)
    assert after["accuracy"] > base["accuracy"] + 0.4  # an untrained head is at chance (0.2)
    assert after["macro_f1"] >= 0.88 and after["mcc"] >= 0.85


@pytest.mark.xdist_group("smollm2-text")
def test_smollm2_perplexity_on_bbc_text_falls_by_15_percent(smollm2_text_base, smollm2_text_xs, smollm2_path,
                                                           bbc_text, in_real_home):  # fmt: skip
    """SmolLM2-135M as a language model of BBC articles: held-out perplexity falls by >= 15%
    (measured: 67.6 -> 52.0 in 30 steps of 8 articles cut to 64 tokens, held out the openings of
    20 articles; -23%)."""
    base, run = smollm2_text_base, smollm2_text_xs
    after = loraxs_json("eval", smollm2_path, "--adapter", run["out"] / "adapter", "--data", bbc_text[1],
                        "--task", "causal-lm", "--max-length", 64)["results"][0]  # fmt: skip
    print(f"\nbase {base}\ntrained {after}")
    assert after["perplexity"] <= 0.85 * base["perplexity"], (base, after)
    # `eval` on the saved adapter scores what `train` measured on the same held-out file
    assert after["loss"] == pytest.approx(run["eval"]["loss"], rel=1e-4), (after, run["eval"])


ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards")
NAMES = ("Tom", "Anna", "Ravi", "Mia", "Lena", "Omar", "Kai", "Sara")


def word_problem(rng: random.Random) -> dict:
    """A one-step addition or subtraction word problem as a chat, answered with the worked equation
    (its last number is the answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        answer = f"{a} + {b} = {a + b}"
    else:
        question = f"{name} has {a + b} {item} and gives away {b}. How many {item} are left?"
        answer = f"{a + b} - {b} = {a}"
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": chat}


def test_smollm2_instruct_answers_word_problems_better_after_training(smollm2_path, tmp_path, loraxs_home):
    """Measured, with 48 new tokens: exact match 0.19 for the base model (it rambles, or slips on two-digit
    sums) and 0.48 after 20 steps that teach it to answer with the worked equation (0.56 after 40; 12 steps
    at lr 1e-2: 0.35). With the 24 new tokens used here (half the decoding time) the base reaches 0.04:
    its right answers come after a preamble; the trained model's, 0.48, fit in 24."""
    rng = random.Random(0)
    train = write_jsonl(tmp_path / "train.jsonl", [word_problem(rng) for _ in range(320)])
    test = write_jsonl(tmp_path / "test.jsonl", [word_problem(rng) for _ in range(48)])
    base, after, _ = train_then_eval(
        smollm2_path, train, test, tmp_path / "run",
        "--task", "causal-lm", "--rank", 16, "--max-length", 96, "--batch-size", 8, "--max-steps", 20,
        "--lr", 5e-3, "--warmup-ratio", 0.1,
        eval_args=("--generate", "--max-new-tokens", 24, "--batch-size", 16),
    )  # fmt: skip
    assert after["exact_match"] >= base["exact_match"] + 0.25, (base, after)  # measured gain: 0.44
