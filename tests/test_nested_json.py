"""JSON nested deeper than the parser goes (a crafted `[[[[...]]]]`) is bad input wherever loraxs reads
JSON that a user or another tool wrote: one line, exit 3, never "internal error" (issue 16, class 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraxs_cli.checkpoint import load_state
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError
from loraxs_cli.fsutil import loads_json
from models_for_tests import make_adapter

DEEP = "[" * 200_000 + "]" * 200_000


def one_line_exit_3(result) -> str:
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output and "internal error" not in result.output
    return errors[0]


def test_loads_json_turns_deep_nesting_into_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json(DEEP)
    assert loads_json('{"a": [1, 2]}') == {"a": [1, 2]}


def test_a_deeply_nested_adapter_config_is_bad_input(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    (adapter / "loraxs_config.json").write_text(DEEP)
    line = one_line_exit_3(CliRunner().invoke(app, ["inspect", str(adapter)]))
    assert "loraxs_config.json" in line


def test_a_deeply_nested_data_row_is_bad_input_at_its_row(tiny_llama_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + DEEP + "\n")
    args = ["train", str(tiny_llama_dir), "--data", str(data), "--rank", "2", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--dry-run", "--no-measure"])
    assert f"{data}:2" in one_line_exit_3(result)


def test_a_deeply_nested_peft_config_is_bad_input(tmp_path):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(DEEP)
    args = ["convert", str(peft_dir), "--from", "peft-lora", "--model", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output


def test_a_deeply_nested_checkpoint_header_is_a_damaged_checkpoint(tmp_path: Path):
    step = tmp_path / "step-1"
    step.mkdir()
    (step / "state.json").write_text(DEEP)
    (step / "state.safetensors").write_bytes(b"")
    with pytest.raises(BadInputError, match="damaged checkpoint"):
        load_state(step)
