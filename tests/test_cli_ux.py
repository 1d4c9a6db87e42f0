"""CLI ergonomics (issue 14): one-line usage errors and cancellations, choice options, names of run
adapters in packs, generation refusing classifiers, `cache ls`/`rm`, the eval table, GGUF advice and
the libraries' progress bars. Through the real CLI: CliRunner in-process, a process where the
process itself (its stderr, its environment) is under test."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraxs_cli.cache import FactorCache
from loraxs_cli.cli.app import app
from loraxs_cli.pack import pack_names
from models_for_tests import make_adapter, smollm2_gguf, tiny_llama_gguf

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line(result, code: int, *fragments: str, prefix: str = "error: ") -> str:
    """The result failed with `code` and exactly one line on stderr (no panel, no traceback)."""
    exit_code = result.returncode if hasattr(result, "returncode") else result.exit_code
    stderr = result.stderr
    assert exit_code == code, (exit_code, stderr)
    assert stderr.startswith(prefix) and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and "╭" not in stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    return stderr


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--foo"], ["No such option: --foo", "(try 'loraxs train --help')"]),
        (["init"], ["Missing argument 'model'", "(try 'loraxs init --help')"]),
        (["init", "m", "--rank", "abc"], ["Invalid value for '--rank'", "(try 'loraxs init --help')"]),
        (["frob"], ["No such command 'frob'", "(try 'loraxs --help')"]),
        (["cache", "ls", "--bar"], ["No such option: --bar", "(try 'loraxs cache ls --help')"]),
        (["eval", "m", "--data", "d", "--task", "foo"], ["'foo' is not one of 'causal-lm', 'seq-cls'"]),
        (["train", "m", "-d", "d", "-o", "o", "--schedule", "cos"], ["'cos' is not one of 'linear'"]),
        (["train", "m", "-d", "d", "-o", "o", "--method", "vera"], ["'vera' is not one of 'xs', 'sb'"]),
        (["generate", "m", "-p", "p", "--dtype", "fp8"], ["'fp8' is not one of 'auto', 'fp32'"]),
        (["convert", "a", "-o", "o", "--from", "lora"], ["'lora' is not one of 'peft-lora', 'official'"]),
        (["inspect", "gpt3-175b", "--dtype", "fp4"], ["'fp4' is not one of 'fp16', 'bf16', 'fp32', 'int8'"]),
        (
            ["train", "m", "-d", "d", "-o", "o", "--chat-loss", "first"],
            ["'first' is not one of 'all', 'last'"],
        ),
        (["train", "m", "-d", "d", "-o", "o", "--sb-step", "sgd"], ["'sgd' is not one of 'adam', 'sign'"]),
        (["init", "m", "-r", "1", "--sb-grad-mode", "x"], ["'x' is not one of 'eval', 'train'"]),
        (["init", "m", "-r", "1", "--sb-accum-dtype", "fp8"], ["'fp8' is not one of 'float32', 'bfloat16'"]),
        (["convert", "a", "-o", "o", "--method", "vera"], ["'vera' is not one of 'auto', 'xs', 'sb'"]),
    ],
    ids=[
        "unknown-option",
        "missing-argument",
        "not-a-number",
        "unknown-command",
        "subcommand-option",
        "task",
        "schedule",
        "method",
        "dtype",
        "from",
        "storage-dtype",
        "chat-loss",
        "sb-step",
        "sb-grad-mode",
        "sb-accum-dtype",
        "official-method",
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, fragments):
    stderr = one_line(invoke(*args), 2, *fragments)
    assert "Value error" not in stderr  # typer's pydantic wording is trimmed


def test_usage_error_of_the_real_program_is_one_line():
    run = subprocess.run(
        [sys.executable, "-m", "loraxs_cli", "train", "--foo"], capture_output=True, text=True, timeout=60
    )
    one_line(run, 2, "No such option: --foo", "(try 'loraxs train --help')")


def test_no_arguments_still_prints_the_help():
    result = invoke()
    assert result.exit_code == 2 and "Usage: loraxs" in result.stdout and result.stderr == ""


def test_choice_options_show_their_values_in_help():
    for command, shown in [
        ("init", ["<xs|sb>", "<torch|sklearn|exact>", "<auto|fp32|bf16|fp16>"]),
        ("train", ["<xs|sb>", "<linear|cosine|constant>"]),
        ("convert", ["<peft-lora>", "<peft-lora|official>"]),
        ("inspect", ["<fp16|bf16|fp32|int8>"]),
    ]:
        result = invoke(command, "--help", env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for text in shown:
            assert text in result.stdout, (command, text)


def test_every_choice_option_is_a_real_choice():
    """No option of any command takes free text where it only accepts a few values."""
    import click
    import typer.main

    free = {"--targets", "--data", "--eval-data", "--out", "--metric", "--max-grad-memory", "--device",
            "--revision", "--answer-regex", "--prompts", "--adapter", "--adapters", "--name", "--config",
            "--model", "--lr", "--lm-eval"}  # fmt: skip
    group = typer.main.get_command(app)
    commands = [(n, c) for n, c in group.commands.items() if not isinstance(c, click.Group)]
    commands += [(f"cache {n}", c) for n, c in group.commands["cache"].commands.items()]
    for name, command in commands:
        for param in command.params:
            flag = next((o for o in param.opts if o.startswith("--")), None)
            if isinstance(param, click.Option) and param.type == click.STRING and flag not in free:
                raise AssertionError(f"loraxs {name} {flag} is free text")


def test_output_options_work_before_and_after_the_command(tiny_llama_dir):
    args = ["init", tiny_llama_dir, "-r", "1", "-t", "q_proj", "--dry-run"]
    before, after = invoke("--json", *args), invoke(*args, "--json")
    assert before.exit_code == after.exit_code == 0, (before.stderr, after.stderr)
    assert json.loads(before.stdout) == json.loads(after.stdout)
    for verbose in (invoke("-v", *args), invoke(*args, "-v"), invoke(*args, "--verbose")):
        assert verbose.exit_code == 0 and "resolving" in verbose.stderr, verbose.stderr
    assert "resolving" not in invoke(*args).stderr
    computed = ["init", tiny_llama_dir, "-r", "1", "-t", "q_proj"]
    for quiet in (
        invoke("-q", *computed, "--force"),
        invoke(*computed, "-q", "--force"),
        invoke(*computed, "-v", "-q"),
    ):
        assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr  # -q wins over -v
        assert "factor pairs at rank 1" in quiet.stdout
    assert "cache miss" in invoke(*computed, "--force").stderr  # without -q the progress note shows


def test_the_same_device_check_in_every_command(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": None, "prompt": "a"}])
    commands = {
        "init": ["init", tiny_llama_dir, "-r", "1"],
        "eval": ["eval", tiny_llama_dir, "-d", data],
        "generate": ["generate", tiny_llama_dir, "-p", prompts],
        "train": ["train", tiny_llama_dir, "-d", data, "-o", tmp_path / "run", "--max-steps", "1"],
        "train --dry-run": ["train", tiny_llama_dir, "-d", data, "-o", tmp_path / "run", "--dry-run"],
    }
    for device, fragment in [("gpu", "is not a device"), ("cuda:99", "CUDA device(s) available here"),
                             ("xla", "loraxs runs on cpu, cuda, mps")]:  # fmt: skip
        lines = {
            name: one_line(invoke(*args, "--device", device), 3, fragment) for name, args in commands.items()
        }
        assert len(set(lines.values())) == 1, lines
    assert not (tmp_path / "run").exists()
    # merge runs where its shards are (no --device): a usage error like any unknown option
    one_line(
        invoke("merge", tiny_llama_dir, "-a", "x", "-o", tmp_path / "m", "--device", "gpu"), 2, "--device"
    )


def test_train_help_shows_its_options_in_panels():
    import typer.main

    from loraxs_cli.cli.train_cmd import TrainCommand

    command = typer.main.get_command(app).commands["train"]
    grouped = {name for names in TrainCommand.panels.values() for name in names}
    assert {p.name for p in command.params if isinstance(p, typer.core.TyperOption)} <= grouped
    shown = invoke("train", "--help", env={"COLUMNS": "200"}).stdout
    for title in TrainCommand.panels:
        assert f"╭─ {title} " in shown, title
    assert (
        shown.index("╭─ Optimisation ")
        < shown.index("--weight-decay")
        < shown.index("╭─ Schedule and cadence ")
    )


def test_a_choice_from_a_config_file_is_checked_too(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("schedule: sometimes\n")
    result = invoke("train", "m", "-d", "d", "-o", "o", "--config", config)
    one_line(result, 2, "'sometimes' is not one of 'linear', 'cosine', 'constant'")


# ----------------------------------------------------------------------------- Ctrl-C, declining


def test_ctrl_c_is_one_plain_line_and_130(monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FactorCache, "entries", interrupted)
    result = invoke("cache", "ls")
    assert result.exit_code == 130 and result.stderr == "interrupted\n", result.stderr


def test_ctrl_c_during_training_prints_only_the_checkpoint_note(tiny_llama_dir, tmp_path, monkeypatch):
    import torch

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"{i} plus 1 is", "response": f" {i + 1}"} for i in range(8)]
    )
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    run = tmp_path / "run"
    result = invoke(
        "train", tiny_llama_dir, "--data", data, "--out", run, "--rank", "2", "--batch-size", "4",
        "--max-length", "16", "--max-steps", "6", "--save-every", "0",
    )  # fmt: skip
    assert result.exit_code == 130, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("interrupted at step 2: checkpoint written"), result.stderr
    assert [line for line in lines if line.startswith(("interrupted", "error"))] == lines[-1:]


def test_declining_cache_rm_removes_nothing_and_exits_0(tiny_llama_dir):
    assert invoke("init", tiny_llama_dir, "-r", "2").exit_code == 0
    (entry,) = FactorCache().entries()
    for answer in ("n\n", ""):  # "no", and no answer at all (end of input)
        result = invoke("cache", "rm", entry.id, input=answer)
        assert result.exit_code == 0, result.stderr
        assert result.stderr.rstrip().endswith("cancelled: nothing removed")
        assert FactorCache().get(entry.id) is not None
    assert invoke("cache", "rm", entry.id, input="y\n").exit_code == 0
    assert list(FactorCache().entries()) == []


# ----------------------------------------------------------------------------- cache ls / rm


@pytest.fixture
def two_dtypes(tiny_llama_dir) -> list[str]:
    """Two entries of one base that differ only in the dtype the weights were read in."""
    ids = []
    for dtype in ("fp32", "bf16"):
        result = invoke("init", tiny_llama_dir, "-r", "2", "-t", "q_proj,v_proj", "--dtype", dtype, "--json")
        assert result.exit_code == 0, result.stderr
        ids.append(json.loads(result.stdout)["entry"])
    return ids


@pytest.mark.parametrize("columns", ["50", "80", "250"])
def test_cache_ls_shows_whole_ids_dtype_and_targets(two_dtypes, columns):
    result = invoke("cache", "ls", env={"COLUMNS": columns})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    for entry_id in two_dtypes:  # whole, on one line, so it pastes into `cache rm`
        assert any(entry_id in line for line in lines), (entry_id, result.stdout)
    assert "…" not in result.stdout
    dtypes = dict(zip(two_dtypes, ("fp32", "bf16"), strict=True))
    rows = {i: line for line in lines for i in two_dtypes if i in line}
    assert len(rows) == 2
    for entry_id, row in rows.items():
        if columns == "250":  # wide: a table row per entry with its dtype and targets
            shown = row
        else:  # narrow: the id alone on its line, the details on the next
            assert row.strip() == entry_id
            shown = lines[lines.index(row) + 1]
        assert "q_proj, v_proj (4 modules)" in shown, shown
        other = ({"fp32", "bf16"} - {dtypes[entry_id]}).pop()
        assert dtypes[entry_id] in shown and other not in shown, shown


def test_cache_ls_json_has_dtype_and_targets(two_dtypes):
    doc = json.loads(invoke("cache", "ls", "--json").stdout)
    rows = {r["id"]: r for r in doc["entries"]}
    assert [rows[i]["dtype"] for i in two_dtypes] == ["fp32", "bf16"]
    assert rows[two_dtypes[0]]["targets"] == ["self_attn.q_proj", "self_attn.v_proj"]


def test_cache_rm_takes_the_base_name_that_ls_shows(two_dtypes, tiny_llama_dir):
    doc = json.loads(invoke("cache", "ls", "--json").stdout)
    base = doc["entries"][0]["base"]
    assert base == tiny_llama_dir.name and all(r["base"] == base for r in doc["entries"])
    result = invoke("cache", "rm", base, "-y", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads(result.stdout)["removed"]) == sorted(two_dtypes)
    assert list(FactorCache().entries()) == []
    one_line(invoke("cache", "rm", base, "-y"), 3, f"no cache entry or base {base!r}")


# ----------------------------------------------------------------------------- pack, generate names


@pytest.fixture
def runs(tiny_llama_dir, tmp_path) -> Path:
    """runs/alice/adapter and runs/bob/adapter, as `loraxs train` lays them out."""
    for seed, name in enumerate(("alice", "bob")):
        make_adapter(tiny_llama_dir, tmp_path / "runs" / name / "adapter", seed=seed)
    return tmp_path / "runs"


def test_pack_of_run_adapters_names_members_after_their_runs(runs, tmp_path):
    pack = tmp_path / "users.safetensors"
    result = invoke("pack", *sorted(runs.glob("*/adapter")), "--out", pack, "--json")  # runs/*/adapter
    assert result.exit_code == 0, result.stderr
    assert pack_names(pack) == ["alice", "bob"]
    shutil.copytree(runs / "alice" / "adapter", runs / "alice" / "best")
    duplicate = invoke(
        "pack", runs / "alice" / "adapter", runs / "alice" / "best", "--out", tmp_path / "x.safetensors"
    )
    one_line(duplicate, 2, "two adapters are named 'alice'", "alice/adapter and ", "alice/best", "NAME=DIR")
    renamed = invoke(
        "pack",
        runs / "alice" / "adapter",
        f"alice-best={runs / 'alice' / 'best'}",
        "--out",
        tmp_path / "y.safetensors",
    )
    assert renamed.exit_code == 0, renamed.stderr
    assert pack_names(tmp_path / "y.safetensors") == ["alice", "alice-best"]


def test_generate_names_run_adapters_after_their_runs(tiny_llama_dir, runs, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": "bob", "prompt": "1 plus 1 is"}])
    alice, bob = runs / "alice" / "adapter", runs / "bob" / "adapter"
    result = invoke(
        "generate", tiny_llama_dir, "-a", alice, "-a", bob, "--prompts", prompts, "--max-new-tokens", "2"
    )
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["adapter"] for line in result.stdout.splitlines()] == ["bob"]


def test_generate_refuses_a_classifier_adapter(tiny_bert_dir, tmp_path):
    adapter = make_adapter(tiny_bert_dir, tmp_path / "topics", task="seq-cls", labels=["a", "b"])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": "topics", "prompt": "hello"}])
    result = invoke("generate", tiny_bert_dir, "-a", adapter, "--prompts", prompts)
    stderr = one_line(result, 4, "'topics'", "is a seq-cls adapter", "generation needs a causal-lm adapter")
    assert "linear layer" not in stderr


# ----------------------------------------------------------------------------- eval table


def test_eval_table_keeps_the_part_of_adapter_paths_that_differs(tiny_llama_dir, runs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i} and", "response": f" {i}"} for i in range(4)])
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "runs"
    shutil.copytree(runs, deep)
    adapters = [deep / "alice" / "adapter", deep / "bob" / "adapter"]
    result = invoke("eval", tiny_llama_dir, "--data", data, "-a", adapters[0], "-a", adapters[1],
                    env={"COLUMNS": "80"})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "…" not in result.stdout
    cells = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert "alice/adapter" in cells and "bob/adapter" in cells, result.stdout
    assert "adapters under" in result.stdout


# ----------------------------------------------------------------------------- GGUF


def test_gguf_progress_bar_stays_off_stderr_with_json(tmp_path):
    """transformers' own GGUF dequantization bar (a bare tqdm) must not reach a --json run's stderr.
    A process: the program's startup switches the bars off. A tiny GGUF shows the same bar."""
    gguf_file = tiny_llama_gguf(tmp_path / "tiny.gguf")
    env = {**os.environ, "LORAXS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    for variable in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):  # as a user's shell has them
        env.pop(variable, None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraxs_cli",
            "--json",
            "init",
            str(gguf_file),
            "-r",
            "1",
            "-t",
            "q_proj",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["cache"] == "miss"
    assert "de-quantizing" not in run.stderr and "%|" not in run.stderr, run.stderr[-2000:]


def test_library_progress_is_switched_off_with_json_quiet_or_no_terminal(monkeypatch):
    from loraxs_cli.cli import output

    for terminal, argv, quiet in [
        (True, ["init", "m"], False),
        (True, ["--json", "init", "m"], True),
        (True, ["-q", "init", "m"], True),
        (False, ["init", "m"], True),
    ]:
        for variable in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal)
        output.quiet_library_progress(argv)
        assert (os.environ.get("TQDM_DISABLE") == "1") is quiet, (terminal, argv)
        assert (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1") is quiet


def test_merge_on_a_gguf_base_gives_advice_that_works(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    result = invoke("merge", gguf, "--adapter", adapter, "--out", tmp_path / "merged")
    stderr = one_line(result, 3, "needs a safetensors base", "from_config", "load_state_dict", "README")
    assert "save_pretrained() first" not in stderr


@pytest.mark.real
@pytest.mark.slow
def test_the_readme_gguf_recipe_makes_a_loadable_safetensors_copy(tmp_path, monkeypatch):
    """The code the merge advice points to runs with the installed transformers."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"\n((?:    .*\n)*    model\.save_pretrained\(\"model-dir\"\)\n(?:    .*\n)*)", readme)
    assert block, "README has no GGUF recipe"
    gguf = smollm2_gguf()
    code = "\n".join(line[4:] for line in block.group(1).splitlines())
    code = code.replace('"gguf-dir"', repr(str(gguf.parent))).replace('"model.gguf"', repr(gguf.name))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    result = invoke("init", tmp_path / "model-dir", "-r", "1", "-t", "q_proj", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["model_type"] == "llama"
