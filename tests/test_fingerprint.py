"""Base fingerprints: change with any target weight, memoised, LFS oids from the hub."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file
from test_models import COMMIT, hub_snapshot

from loraxs_cli import fingerprint as fp
from loraxs_cli.models import resolve_model


@pytest.fixture
def model_copy(tmp_path, tiny_llama_dir):
    """A private copy of the tiny Llama whose weights the test may change."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "llama-copy")


def _count_hashing(monkeypatch) -> list:
    calls = []
    real = fp.sha256_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(fp, "sha256_file", counting)
    return calls


def test_changing_one_target_weight_changes_the_fingerprint(model_copy):
    before = fp.fingerprint(resolve_model(str(model_copy)))
    assert len(before) == 16 and int(before, 16) >= 0
    assert fp.fingerprint(resolve_model(str(model_copy))) == before  # stable
    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.self_attn.v_proj.weight"
    tensors[key][3, 5] += 1e-3  # one number of one target module
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert fp.fingerprint(resolve_model(str(model_copy))) != before


def test_copies_of_the_same_weights_share_a_fingerprint(tmp_path, tiny_llama_dir):
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "elsewhere")
    assert fp.fingerprint(resolve_model(str(copy))) == fp.fingerprint(resolve_model(str(tiny_llama_dir)))


def test_local_files_are_hashed_once_and_remembered_by_path_size_mtime(model_copy, loraxs_home, monkeypatch):
    calls = _count_hashing(monkeypatch)
    resolved = resolve_model(str(model_copy))
    first = fp.fingerprint(resolved)
    assert len(calls) == 1
    memo = json.loads((loraxs_home / "fingerprints.json").read_text())
    weights = model_copy / "model.safetensors"
    stat = weights.stat()
    assert f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}" in memo
    assert fp.fingerprint(resolved) == first
    assert len(calls) == 1, "a second fingerprint must come from the memo"
    # Touching the file (same bytes, new mtime) invalidates the memo entry but not the fingerprint.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fp.fingerprint(resolved) == first
    assert len(calls) == 2


def test_memo_is_only_a_shortcut_when_the_home_is_unwritable(model_copy, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LORAXS_HOME", str(blocker / "home"))  # mkdir fails, even for root
    value = fp.fingerprint(resolve_model(str(model_copy)))
    monkeypatch.setenv("LORAXS_HOME", str(tmp_path / "ok-home"))
    assert value == fp.fingerprint(resolve_model(str(model_copy)))


def test_hub_snapshot_uses_lfs_sha256_and_commit_without_rehashing(tmp_path, tiny_llama_dir, monkeypatch):
    import huggingface_hub.constants as hub_constants

    calls = _count_hashing(monkeypatch)
    home_a, home_b = tmp_path / "hf-a", tmp_path / "hf-b"
    hub_snapshot(home_a, tiny_llama_dir, commit=COMMIT)
    hub_snapshot(home_b, tiny_llama_dir, commit="f" * 40)

    def fingerprint_in(home):
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
        return fp.fingerprint(resolve_model("org/tiny"))

    at_commit = fingerprint_in(home_a)
    assert calls == [], "weight files of a hub snapshot are named by their sha256 already"
    # Same weights at another commit: another fingerprint (DESIGN: LFS sha256 of each shard + commit).
    assert fingerprint_in(home_b) != at_commit
    # The value is exactly the documented composition.
    sha = fp.sha256_file(tiny_llama_dir / "model.safetensors")
    blob = json.dumps({"model.safetensors": sha, "commit": COMMIT}, sort_keys=True).encode()
    assert at_commit == fp.hashlib.sha256(blob).hexdigest()[:16]
