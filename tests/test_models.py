"""Model resolution (local directory, Hugging Face cache, GGUF) and target selection per architecture."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraxs_cli.errors import BadInputError
from loraxs_cli.models import (
    linear_modules,
    match_targets,
    parse_targets,
    resolve_model,
    weight_files,
    weight_matrix,
)
from models_for_tests import smollm2_gguf, tiny_bert, tiny_gpt2, tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(hf_home: Path, model_dir: Path, repo_id: str = "org/tiny", commit: str = COMMIT) -> Path:
    """Lay `model_dir` out as huggingface_hub's cache does: blobs named by their LFS sha256 (git sha1 for
    small files), a snapshot of relative symlinks, and refs/main naming the commit. Returns the snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        lfs = file.suffix == ".safetensors"
        blob = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / file.name)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An isolated HF cache for this process (huggingface_hub reads HF_HOME once, at import)."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


# ----------------------------------------------------------------------------- resolution


def test_local_directory(tiny_llama_dir):
    resolved = resolve_model(str(tiny_llama_dir))
    assert resolved.kind == "dir" and resolved.gguf_file is None and resolved.commit is None
    assert resolved.path == tiny_llama_dir.resolve()
    assert [p.name for p in weight_files(resolved)] == ["model.safetensors"]
    assert resolved.slug == tiny_llama_dir.name


def test_generic_directory_name_gets_its_parent_in_the_slug(tmp_path):
    model = tmp_path / "my-run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert resolve_model(str(model)).slug == "my-run-model"


def test_bad_local_paths(tmp_path):
    with pytest.raises(BadInputError, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(BadInputError, match="not a model directory"):
        resolve_model(str(tmp_path))
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(BadInputError, match=r"a directory, a Hugging Face id or a \.gguf file"):
        resolve_model(str(text))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match="no weight files"):
        weight_files(resolve_model(str(tmp_path)))


def test_gguf_file_and_directory_with_one_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    by_file = resolve_model(str(tmp_path / "m.gguf"))
    by_dir = resolve_model(str(tmp_path))
    for resolved in (by_file, by_dir):
        assert resolved.kind == "gguf" and resolved.gguf_file == "m.gguf"
        assert resolved.from_pretrained_kwargs() == {"gguf_file": "m.gguf"}
        assert weight_files(resolved) == [tmp_path.resolve() / "m.gguf"]
    assert by_file.slug == "m"


def test_hub_id_from_the_local_cache(hf_home, tiny_llama_dir):
    snapshot = hub_snapshot(hf_home, tiny_llama_dir)
    resolved = resolve_model("org/tiny")
    assert resolved.kind == "hub" and resolved.repo_id == "org/tiny" and resolved.commit == COMMIT
    assert resolved.path == snapshot
    assert resolved.slug == "org--tiny"
    assert resolve_model("org/tiny", revision=COMMIT).path == snapshot


def test_hub_id_not_cached_while_offline(hf_home):
    with pytest.raises(BadInputError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model("org/absent")


def _one_line(result, code: int, *fragments: str) -> str:
    exit_code = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert exit_code == code, (exit_code, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


@pytest.mark.parametrize("command", [["init", "org/absent", "-r", "4"], ["inspect", "org/absent"]])
def test_hub_id_not_cached_while_offline_says_what_to_do(hf_home, tiny_llama_dir, command):
    from typer.testing import CliRunner

    from loraxs_cli.cli.app import app

    hub_snapshot(hf_home, tiny_llama_dir)  # the cache holds another model
    result = CliRunner().invoke(app, command)
    stderr = _one_line(result, 3, "org/absent: not in the Hugging Face cache", "HF_HUB_OFFLINE is set")
    for fragment in ("unset HF_HUB_OFFLINE", "`hf download org/absent`", "pass a local directory"):
        assert fragment in stderr
    assert str(hf_home / "hub") in stderr
    assert "LocalEntryNotFoundError" not in stderr


def test_hub_cache_env_offline_in_a_real_process(tmp_path, tiny_llama_dir):
    """HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them: the cached id resolves, another is explained."""
    hub_snapshot(tmp_path / "hf", tiny_llama_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)

    def loraxs(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "loraxs_cli", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    cached = loraxs("init", "org/tiny", "-r", "4", "--dry-run", "--json")
    assert cached.returncode == 0, cached.stderr
    other = loraxs("init", "org/other", "-r", "4", "--revision", "v2")
    stderr = _one_line(other, 3, "org/other: not in the Hugging Face cache at revision 'v2'")
    assert "HF_HUB_OFFLINE is set" in stderr and "`hf download org/other --revision v2`" in stderr
    assert str(tmp_path / "hf" / "hub") in stderr


def _hub_errors() -> dict:
    """huggingface_hub's own exception types, as snapshot_download raises them."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def response(status: int):
        return httpx2.Response(status, request=httpx2.Request("GET", "https://hub.invalid/api/models/org/m"))

    def unreachable():
        try:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
        except httpx2.ConnectError as cause:
            try:
                raise LocalEntryNotFoundError("An error happened while trying to locate the files") from cause
            except LocalEntryNotFoundError as error:
                return error

    return {
        "gated": GatedRepoError("403 gated", response=response(403)),
        "not-found": RepositoryNotFoundError("404 not found", response=response(404)),
        "unauthorized": HfHubHTTPError("401", response=response(401)),
        "revision": RevisionNotFoundError("404 revision", response=response(404)),
        "unreachable": unreachable(),
        "incomplete": IncompleteSnapshotError("incomplete snapshot", snapshot_path="/x"),
        "server": HfHubHTTPError("500", response=response(500)),
    }


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("gated", ["org/m is a gated model", "accept its conditions", "`hf auth login`"]),
        ("not-found", ["org/m: no such model on the Hugging Face Hub; check the id", "`hf auth login`"]),
        ("unauthorized", ["no such model on the Hugging Face Hub; check the id", "private"]),
        ("revision", ["org/m: no revision 'v9' on the Hugging Face Hub; check --revision"]),
        ("unreachable", ["the Hub cannot be reached (ConnectError)", "HF_HUB_OFFLINE=1", "local directory"]),
        ("incomplete", ["the cached copy at revision 'v9' is incomplete", "hf download org/m --revision v9"]),
        ("server", ["the Hugging Face Hub answered HTTP 500; try again later"]),
    ],
)
def test_hub_failures_say_why_and_what_to_do(kind, fragments, monkeypatch):
    """Online (HF_HUB_OFFLINE unset): the cache misses, then the hub call fails with its own type."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from typer.testing import CliRunner

    from loraxs_cli.cli.app import app

    error = _hub_errors()[kind]
    calls = []

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = CliRunner().invoke(app, ["init", "org/m", "-r", "4", "--revision", "v9"])
    stderr = _one_line(result, 3, *fragments)
    assert "LocalEntryNotFoundError" not in stderr and type(error).__name__ not in stderr
    assert calls == [True, False], calls  # the cache first, then the hub


def test_unknown_preset_lists_the_presets():
    from typer.testing import CliRunner

    from loraxs_cli.cli.app import app
    from loraxs_cli.estimate import preset_names

    result = CliRunner().invoke(app, ["inspect", "gpt3-17b"])
    stderr = _one_line(result, 3, "gpt3-17b: no such model directory, preset", "did you mean gpt3-175b?")
    assert all(name in stderr for name in preset_names())
    assert "LocalEntryNotFoundError" not in stderr


def test_hub_cache_through_the_cli_honours_hf_home(tmp_path, tiny_llama_dir):
    """A real process: HF_HOME and HF_HUB_OFFLINE from the environment, nothing patched."""
    home = tmp_path / "hf"
    hub_snapshot(home, tiny_llama_dir)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-m", "loraxs_cli", "init", "org/tiny", "-r", "4", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["model"] == "org/tiny" and doc["model_type"] == "llama"
    assert doc["modules"] == 14 and doc["cache"] == "miss"


# ----------------------------------------------------------------------------- targets


def _kinds(names):
    return {n.split(".", 2)[-1] for n in names}


def test_default_targets_llama():
    modules = linear_modules(tiny_llama(vocab_size=64))
    names = match_targets(modules, None, "llama")
    assert len(names) == 2 * 7
    assert _kinds(names) == {
        f"{part}" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert match_targets(modules, None, "mistral") == names == match_targets(modules, None, "qwen2")


def test_default_targets_bert():
    modules = linear_modules(tiny_bert(vocab_size=64))
    names = match_targets(modules, None, "bert")
    suffixes = {n.split(".", 3)[-1] for n in names}
    # The official LoRA-XS / LoRA-SB GLUE targets: the attention output and the FFN output (fc2).
    assert suffixes == {
        "attention.self.query",
        "attention.self.value",
        "attention.output.dense",
        "output.dense",
    }
    assert len(names) == 2 * 4
    assert "encoder.layer.0.output.dense" in names and "encoder.layer.0.attention.output.dense" in names
    # Not the key, not the FFN input (intermediate.dense), not the pooler or the classifier.
    assert not any(n.endswith(("key", "intermediate.dense", "pooler.dense")) for n in names)
    assert "classifier" not in " ".join(modules)


def test_default_targets_gpt2_conv1d():
    model = tiny_gpt2(vocab_size=64)
    modules = linear_modules(model)
    names = match_targets(modules, None, "gpt2")
    assert _kinds(names) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    info = modules["h.0.mlp.c_fc"]
    assert info.is_conv1d and (info.out_features, info.in_features) == (256, 64)
    conv = dict(model.transformer.named_modules())["h.0.mlp.c_fc"]
    assert conv.weight.shape == (64, 256)  # Conv1D stores the transpose
    assert weight_matrix(conv).shape == (256, 64)
    assert torch.equal(weight_matrix(conv), conv.weight.t())


def test_explicit_targets_suffix_glob_and_all_linear():
    modules = linear_modules(tiny_llama(vocab_size=64))
    assert match_targets(modules, ["q_proj", "v_proj"], "llama") == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]
    assert match_targets(modules, ["layers.1.mlp.*"], "llama") == [
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.1.mlp.down_proj",
    ]
    assert match_targets(modules, ["all-linear"], "llama") == list(modules)
    assert parse_targets("q_proj, v_proj,,") == ["q_proj", "v_proj"]
    assert parse_targets(["q_proj,k_proj", "o_proj"]) == ["q_proj", "k_proj", "o_proj"]
    assert parse_targets(None) is None and parse_targets(" , ") is None


def test_unknown_targets_list_the_linear_module_names():
    modules = linear_modules(tiny_llama(vocab_size=64))
    with pytest.raises(BadInputError) as error:
        match_targets(modules, ["q_proj", "query"], "llama")
    message = str(error.value)
    assert "query" in message and "match no linear module" in message
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        assert kind in message
    assert "\n" not in message and "layers.0" not in message  # one line, layer indices removed


def test_unknown_architecture_needs_targets():
    modules = linear_modules(tiny_llama(vocab_size=64))
    with pytest.raises(BadInputError, match=r"no default targets for model type 'mystery'.*all-linear"):
        match_targets(modules, None, "mystery")


# ----------------------------------------------------------------------------- real GGUF


@pytest.mark.real
def test_real_smollm2_gguf_resolves_and_loads_the_same_weights(smollm2_path):
    from loraxs_cli.initialize import describe_base
    from loraxs_cli.models import backbone, load_model

    gguf = smollm2_gguf()
    base = describe_base(str(gguf))
    assert base.resolved.kind == "gguf" and base.resolved.gguf_file == gguf.name
    assert base.model_type == "llama"
    targets = match_targets(base.modules, None, base.model_type)
    assert len(targets) == 30 * 7
    assert base.shapes(["layers.0.self_attn.k_proj"]) == {"layers.0.self_attn.k_proj": (192, 576)}
    model = load_model(base.resolved, head="base")
    assert not hasattr(model.config, "quantization_config")  # a plain model, not flagged quantized
    plain = load_model(resolve_model(str(smollm2_path)), head="base")
    for name in ("layers.0.self_attn.q_proj", "layers.29.mlp.down_proj"):
        got = dict(backbone(model).named_modules())[name].weight
        want = dict(backbone(plain).named_modules())[name].weight
        assert torch.equal(got.float(), want.float()), name
