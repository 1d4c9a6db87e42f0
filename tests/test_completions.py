"""Committed completion scripts must match what the app generates (see completions/generate.sh)."""

from __future__ import annotations

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
