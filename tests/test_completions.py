"""Committed completion scripts must match what the app generates (see completions/generate.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


def _generate(shell: str) -> str:
    env = {**os.environ, "_LORAXS_COMPLETE": f"source_{shell}"}
    # The generated script names the program it completes; run the app under the name `loraxs`.
    code = "import sys; sys.argv[0] = 'loraxs'; from loraxs_cli.cli.app import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_current(shell):
    committed = (COMPLETIONS / f"loraxs.{shell}").read_text()
    assert committed.strip(), f"completions/loraxs.{shell} is empty"
    assert _generate(shell) == committed, f"completions/loraxs.{shell} is stale: run completions/generate.sh"


def test_completion_answers_subcommands():
    env = {**os.environ, "_LORAXS_COMPLETE": "complete_bash", "COMP_WORDS": "loraxs ca", "COMP_CWORD": "1"}
    code = "import sys; sys.argv[0] = 'loraxs'; from loraxs_cli.cli.app import main; main()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    assert "cache" in out.split()


def _complete(words: str, shell: str = "bash", env: dict | None = None) -> subprocess.CompletedProcess:
    """What the app answers a shell asking to complete `words` (the last word is being typed)."""
    code = "import sys; sys.argv[0] = 'loraxs'; from loraxs_cli.cli.app import main; main()"
    variables = {"_LORAXS_COMPLETE": f"complete_{shell}"}
    if shell == "bash":
        variables |= {"COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)}
    else:  # fish asks twice: is there anything to offer (else it completes paths), and what
        variables |= {"_TYPER_COMPLETE_ARGS": words, "_TYPER_COMPLETE_FISH_ACTION": shell.split("-", 1)[1]}
        variables["_LORAXS_COMPLETE"] = "complete_fish"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **variables, **(env or {})},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "words, expected",
    [
        ("loraxs eval m --data d --task ", ["causal-lm", "seq-cls", "regression", "preference"]),
        ("loraxs init m --method ", ["xs", "sb"]),
        ("loraxs init m --svd sk", ["sklearn"]),
        ("loraxs train m --dtype b", ["bf16"]),
        ("loraxs train m --schedule ", ["linear", "cosine", "constant"]),
        ("loraxs convert a --to ", ["peft-lora"]),
        ("loraxs convert a --from ", ["peft-lora", "official"]),
        ("loraxs convert a --method ", ["auto", "xs", "sb"]),
        ("loraxs train m --chat-loss ", ["all", "last"]),
        ("loraxs train m --sb-step ", ["adam", "sign"]),
        ("loraxs init m --sb-accum-dtype ", ["float32", "bfloat16"]),
        ("loraxs eval m --device c", ["cpu", "cuda", "cuda:0", "cuda:1"]),
        ("loraxs generate m --device cuda:9 --dtype f", ["fp32", "fp16"]),  # a --device is not checked here
        ("loraxs inspect rob", ["roberta-large", "roberta-base"]),
        (
            "loraxs inspect ",
            ["gpt3-175b", "roberta-large", "roberta-base", "mistral-7b", "gemma-7b", "llama-2-7b"],
        ),
    ],
)
def test_choice_values_and_presets_complete(words, expected):
    assert _complete(words).stdout.split() == expected


def test_fish_completes_paths_where_paths_go_and_values_where_values_go():
    for words in ("loraxs train m --data ", "loraxs init ./", "loraxs pack runs/", "loraxs inspect ./"):
        # exit 1: nothing of ours to offer, so fish's own file completion applies (the script's condition)
        assert _complete(words, "fish-is-args").returncode == 1, words
    assert _complete("loraxs eval m --task ", "fish-is-args").returncode == 0
    assert _complete("loraxs eval m --task ", "fish-get-args").stdout.split() == [
        "causal-lm",
        "seq-cls",
        "regression",
        "preference",
    ]
    script = (COMPLETIONS / "loraxs.fish").read_text()
    assert "_TYPER_COMPLETE_FISH_ACTION=is-args" in script and "--condition" in script


def test_cache_rm_completes_ids_and_bases(tiny_llama_dir, loraxs_home):
    from typer.testing import CliRunner

    from loraxs_cli.cli.app import app

    result = CliRunner().invoke(app, ["init", str(tiny_llama_dir), "-r", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    entry = json.loads(result.stdout)["entry"]
    base_dir = entry.split("/")[0]
    answer = _complete("loraxs cache rm ", env={"LORAXS_HOME": str(loraxs_home)}).stdout.split()
    assert answer == [tiny_llama_dir.name, base_dir, entry]
    assert _complete(
        f"loraxs cache rm {base_dir}/", env={"LORAXS_HOME": str(loraxs_home)}
    ).stdout.split() == [entry]
