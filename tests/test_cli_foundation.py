"""The CLI foundation: fast help without torch, `init` output and plans, and every bad-input path
(one line, documented exit code, no traceback unless LORAXS_DEBUG=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loraxs_cli import __version__
from loraxs_cli.cache import FactorCache
from loraxs_cli.cli.app import app
from models_for_tests import tiny_llama_gguf

runner = CliRunner()
HEAVY = ("torch", "transformers", "safetensors", "sklearn", "huggingface_hub")


def run_cli(*args: str, env: dict | None = None, pre: str = "") -> subprocess.CompletedProcess:
    """`loraxs ARGS` as a real process; `pre` is Python run before the app is imported."""
    code = f"{pre}\nimport sys; sys.argv[0] = 'loraxs'; from loraxs_cli.cli.app import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=180,
    )


def imported_modules(*args: str, env: dict | None = None) -> set[str]:
    """Top-level packages a `loraxs ARGS` process imports, from `python -X importtime`."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loraxs_cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [
        line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")
    ]
    return {name.split(".")[0] for name in lines}


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    """A subprocess or CliRunner result that failed with `code` and one `error:` line on stderr."""
    exit_code = result.returncode if hasattr(result, "returncode") else result.exit_code
    stderr = result.stderr
    assert exit_code == code, (exit_code, stderr)
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


# ----------------------------------------------------------------------------- startup cost


@pytest.mark.parametrize(
    "args, env",
    [
        (["--help"], {}),
        (["--version"], {}),
        (["init", "--help"], {}),
        (["cache", "--help"], {}),
        ([], {"_LORAXS_COMPLETE": "complete_bash", "COMP_WORDS": "loraxs init --sv", "COMP_CWORD": "2"}),
        ([], {"_LORAXS_COMPLETE": "source_zsh"}),
    ],
    ids=["help", "version", "init-help", "cache-help", "complete", "completion-script"],
)
def test_help_version_and_completion_do_not_import_torch(args, env):
    modules = imported_modules(*args, env=env)
    assert "loraxs_cli" in modules and "typer" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"loraxs {__version__}"


# ----------------------------------------------------------------------------- init output


def test_init_dry_run_and_json(tiny_bert_dir):
    plan = runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "4", "--dry-run", "--json"])
    assert plan.exit_code == 0, plan.stderr
    doc = json.loads(plan.stdout)
    assert doc["dry_run"] is True and doc["cache"] == "miss" and doc["entry"] is None
    assert doc["model_type"] == "bert" and doc["modules"] == 8 and doc["rank"] == 4
    # 2 layers x (3 square 64x64 + one 128x64): r (m + n) float32 numbers per module.
    assert doc["factor_bytes"] == 4 * 4 * (2 * 3 * 128 + 2 * 192)
    assert doc["target_weight_bytes"] == 4 * 2 * (3 * 64 * 64 + 128 * 64)
    assert list(FactorCache().entries()) == [], "a dry run computes and writes nothing"

    text = runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "4", "--dry-run"])
    assert text.exit_code == 0 and "miss: factors would be computed" in text.stdout

    real = runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "4"], env={"COLUMNS": "200"})
    assert real.exit_code == 0, real.stderr
    assert "share of ||W||_F^2 kept at rank 4" in real.stdout and "attention.self.query" in real.stdout
    entry = next(FactorCache().entries())
    assert "8 factor pairs at rank 4 computed in" in real.stdout and str(entry.path) in real.stdout
    assert "cache miss: computing 8 factor pairs" in real.stderr

    again = json.loads(
        runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "2", "--dry-run", "--json"]).stdout
    )
    assert again["cache"] == "hit" and again["entry"] == entry.id


def test_init_json_document(tiny_gpt2_dir):
    """Through a real process: stdout is exactly one JSON document, progress goes to stderr."""
    run = run_cli("init", str(tiny_gpt2_dir), "-r", "4", "--json", "--svd", "exact")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["cache"] == "miss" and doc["method"] == "xs" and doc["rank"] == doc["r_max"] == 4
    assert {m["name"].split(".", 2)[-1] for m in doc["modules"]} == {
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    }
    shapes = {m["name"]: m["shape"] for m in doc["modules"]}
    assert shapes["h.0.attn.c_attn"] == [192, 64] and shapes["h.0.mlp.c_proj"] == [64, 256]
    assert all(0 < m["energy"] < 1 for m in doc["modules"])
    assert doc["path"].endswith(doc["entry"]) and "SVD" in run.stderr


def test_conv1d_factors_reconstruct_the_transposed_weight(tiny_gpt2_dir):
    """At full rank with the exact SVD, B A is W = Conv1D.weight^T for every target."""
    import torch

    from loraxs_cli.models import backbone, load_model, resolve_model, weight_matrix

    result = runner.invoke(app, ["init", str(tiny_gpt2_dir), "-r", "64", "--svd", "exact", "--json"])
    assert result.exit_code == 0, result.stderr
    entry = FactorCache().get(json.loads(result.stdout)["entry"])
    factors = entry.load(64)
    modules = dict(backbone(load_model(resolve_model(str(tiny_gpt2_dir)))).named_modules())
    for name, parts in factors.items():
        w = weight_matrix(modules[name]).float()
        torch.testing.assert_close(parts["B"] @ parts["A"], w, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def not_a_model(tmp_path):
    folder = tmp_path / "just-files"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


@pytest.mark.parametrize(
    "case, args, code, fragment",
    [
        ("missing", ["{tmp}/nope", "-r", "4"], 3, "no such model directory or file"),
        ("not-a-model", ["{not_a_model}", "-r", "4"], 3, "not a model directory (no config.json)"),
        ("rank-0", ["{llama}", "-r", "0"], 3, "--rank must be a positive integer, got 0"),
        ("rank-negative", ["{llama}", "-r", "-2"], 3, "--rank must be a positive integer"),
        ("rank-too-big", ["{llama}", "-r", "33"], 3, "--rank 33 is larger than min(out, in) = 32"),
        (
            "unknown-targets",
            ["{llama}", "-r", "4", "-t", "query,q_proj"],
            3,
            "this model has: self_attn.q_proj",
        ),
        ("unknown-svd", ["{llama}", "-r", "4", "--svd", "lapack"], 2, "'lapack' is not one of 'torch'"),
        ("unknown-method", ["{llama}", "-r", "4", "--method", "vera"], 2, "'vera' is not one of 'xs', 'sb'"),
        ("unknown-dtype", ["{llama}", "-r", "4", "--dtype", "fp8"], 2, "'fp8' is not one of 'auto', 'fp32'"),
        ("device-unknown", ["{llama}", "-r", "4", "--device", "gpu"], 3, "--device 'gpu' is not a device"),
        ("device-absent", ["{llama}", "-r", "4", "--device", "cuda:99"], 3, "CUDA device(s) available here"),
        ("data-without-sb", ["{llama}", "-r", "4", "--data", "x.jsonl"], 2, "--data is for --method sb"),
        ("hub-offline", ["org/absent-model", "-r", "4"], 3, "HF_HUB_OFFLINE is set"),
    ],
)
def test_init_bad_input(case, args, code, fragment, tmp_path, not_a_model, tiny_llama_dir):
    values = {"tmp": tmp_path, "not_a_model": not_a_model, "llama": tiny_llama_dir}
    result = runner.invoke(app, ["init", *(a.format(**values) for a in args)])
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr
    assert list(FactorCache().entries()) == []


def test_corrupted_cache_entry(tiny_llama_dir):
    first = runner.invoke(app, ["init", str(tiny_llama_dir), "-r", "2", "--json"])
    entry = FactorCache().get(json.loads(first.stdout)["entry"])
    data = bytearray(entry.file.read_bytes())
    entry.file.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    result = runner.invoke(app, ["init", str(tiny_llama_dir), "-r", "2"])
    assert_one_line_error(result, 3, "is damaged: sha256 mismatch", f"loraxs cache rm {entry.id}")


def test_loraxs_debug_shows_the_traceback(tmp_path):
    plain = run_cli("init", str(tmp_path / "missing"), "-r", "2")
    assert_one_line_error(plain, 3, "no such model directory or file")
    debug = run_cli("init", str(tmp_path / "missing"), "-r", "2", env={"LORAXS_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "BadInputError: " in debug.stderr and "resolve_model" in debug.stderr


def _root_ignores_permissions(directory) -> bool:
    probe = directory / "probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


def test_unwritable_cache_directory_chmod(tiny_llama_dir, loraxs_home):
    loraxs_home.mkdir(parents=True)
    loraxs_home.chmod(0o500)
    try:
        if _root_ignores_permissions(loraxs_home):
            pytest.skip("running as root: chmod does not stop writes (see the not-a-directory variant)")
        result = runner.invoke(app, ["init", str(tiny_llama_dir), "-r", "2"])
        assert result.exit_code == 3 and result.stderr.count("\n") == 1
        assert "is not writable" in result.stderr and "LORAXS_HOME" in result.stderr
    finally:
        loraxs_home.chmod(0o700)


def test_unwritable_cache_directory_not_a_directory(tiny_llama_dir, tmp_path, monkeypatch):
    """A home under a regular file cannot be created, whoever runs the test."""
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    monkeypatch.setenv("LORAXS_HOME", str(blocker / "loraxs"))
    result = runner.invoke(app, ["init", str(tiny_llama_dir), "-r", "2"])
    assert_one_line_error(result, 3, "is not writable", "set LORAXS_HOME to a writable directory")


def test_gguf_without_the_gguf_package(tmp_path):
    """The gguf package hidden from a real process (find_spec answers None, import fails)."""
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    run = run_cli("init", str(gguf), "-r", "4", pre="import sys; sys.modules['gguf'] = None")
    assert_one_line_error(run, 3, "needs the gguf package", "pip install 'loraxs[gguf]'")


def test_damaged_gguf_file(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF\x03\x00")
    result = runner.invoke(app, ["init", str(fake), "-r", "4"])
    assert result.exit_code == 3 and result.stderr.count("\n") == 1, result.stderr
    assert "not a readable GGUF file" in result.stderr
