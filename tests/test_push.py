"""`loraxs push` (issue 18, the Hub): the dry run (files, sizes, the card's front matter, read back by
huggingface_hub), the real push against a recording HfApi (repo type, private, the branch, one
upload_folder commit), and the one-line refusals (no token, offline, no network, a public repo for
--private). The base comes from a stand-in Hub through huggingface_hub's own download (hub_for_tests),
so `train` records its hub id as it does for a real one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_for_tests import FakeHub, isolate, serving
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.models import resolve_model
from models_for_tests import make_adapter

runner = CliRunner()
ROWS = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(4) for b in range(3)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """A `loraxs train` run on the hub id org/tiny (downloaded by huggingface_hub from the stand-in
    Hub), an adapter on the cache snapshot given as a path, and one on a plain local directory."""
    root = tmp_path_factory.mktemp("push")
    data = root / "lm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    hub = FakeHub()
    hub.add("org/tiny", tiny_llama_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(root / "home"))
        cache = isolate(root / "hf-home", patch)
        with serving(hub, patch):
            resolve_model("org/tiny")  # huggingface_hub downloads it into the isolated cache
        args = ["--rank", "4", "--batch-size", "4", "--max-length", "32", "--max-steps", "2"]
        result = invoke(
            "train", "org/tiny", "--data", data, "--out", root / "run", "--eval-split", "0.25", *args
        )
        assert result.exit_code == 0, result.output
        snapshot = next((cache / "models--org--tiny" / "snapshots").iterdir())
        make_adapter(snapshot, root / "from-snapshot", rank=2)
        make_adapter(tiny_llama_dir, root / "local", rank=2)
    return {"run": root / "run", "adapter": root / "run" / "adapter", "root": root, "snapshot": snapshot}


def dry_run(adapter, *extra) -> dict:
    result = invoke("push", adapter, "me/tiny-xs", "--dry-run", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_dry_run_lists_files_and_a_front_matter_huggingface_hub_reads(runs):
    from huggingface_hub import ModelCard, metadata_load

    adapter = runs["adapter"]
    doc = dry_run(adapter, "--revision", "v1", "--private")
    sizes = {f["path"]: f["bytes"] for f in doc["files"]}
    assert list(sizes) == ["loraxs_config.json", "adapter.safetensors", "README.md"]
    assert sizes["adapter.safetensors"] == (adapter / "adapter.safetensors").stat().st_size
    assert (doc["repo_id"], doc["revision"], doc["private"]) == ("me/tiny-xs", "v1", True) and doc["dry_run"]
    card = doc["card"]
    assert card["base_model"] == "org/tiny" == doc["base_model"] and card["base_model_relation"] == "adapter"
    assert card["library_name"] == "loraxs" and card["pipeline_tag"] == "text-generation"
    assert {"loraxs", "lora-xs", "text-generation"} <= set(card["tags"])
    # the card `train` wrote is the same writer's: huggingface_hub reads it back, no local path in it
    written = (adapter / "README.md").read_text()
    assert metadata_load(adapter / "README.md") == {**card}
    text = ModelCard.load(adapter / "README.md").text
    assert "rank 4" in text and "(Hugging Face Hub)" in text and "| eval_loss |" in text
    assert "- training data: lm.jsonl (sha256 " in text and "9 rows trained on, 3 held out (25%)" in text
    for local in (str(runs["root"]), str(Path.home()), os.sep + "tmp" + os.sep):
        assert local not in written
    # the human view shows the same: files, sizes, the front matter
    shown = invoke("push", adapter, "me/tiny-xs", "--dry-run")
    assert shown.exit_code == 0 and "dry run: nothing uploaded" in shown.stdout
    assert "adapter.safetensors" in shown.stdout and "base_model: org/tiny" in shown.stdout


def test_the_base_model_is_a_hub_id_or_left_out(runs):
    snapshot = dry_run(runs["root"] / "from-snapshot")
    assert snapshot["base_model"] == "org/tiny"  # a path into the HF cache names its repo
    local = invoke("push", runs["root"] / "local", "me/x", "--dry-run", "--json")
    assert local.exit_code == 0, local.output
    doc = json.loads(local.stdout)
    assert "base_model" not in doc["card"] and doc["base_model"] is None
    assert "no Hugging Face Hub id is known for the base" in local.stderr and "base_model" in doc["notes"][0]


class RecordingApi:
    """HfApi's network methods, recorded (upload_folder also keeps what the folder held)."""

    def __init__(self, monkeypatch, *, private_repo: bool = True):
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import CommitInfo, RepoUrl

        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        calls, uploaded = self.calls, self.uploaded

        def create_repo(api, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def repo_info(api, repo_id, **kwargs):
            calls.append(("repo_info", {"repo_id": repo_id, **kwargs}))
            return type("Info", (), {"private": private_repo})()

        def create_branch(api, repo_id, **kwargs):
            calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api, **kwargs):
            calls.append(("upload_folder", dict(kwargs)))
            uploaded.update({p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()})
            url = f"https://huggingface.co/{kwargs['repo_id']}/commit/{'a' * 40}"
            return CommitInfo(commit_url=url, commit_message="", commit_description="", oid="a" * 40)

        for name, method in locals().copy().items():
            if name in ("create_repo", "repo_info", "create_branch", "upload_folder"):
                monkeypatch.setattr(HfApi, name, method)


def online(monkeypatch, token: str | None = "hf_test_token") -> None:
    """No HF_HUB_OFFLINE; HF_TOKEN set or, with None, no token anywhere huggingface_hub looks."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)


def test_push_is_one_upload_folder_commit_to_a_model_repo(runs, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    isolate(tmp_path / "hf", monkeypatch)
    online(monkeypatch)
    api = RecordingApi(monkeypatch)
    adapter = runs["adapter"]
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    result = invoke("push", adapter, "me/tiny-xs", "--private", "--revision", "v1", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["commit_url"].endswith("a" * 40) and doc["url"] == "https://huggingface.co/me/tiny-xs"
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    create, _, branch, upload = (kwargs for _, kwargs in api.calls)
    assert create == {"repo_id": "me/tiny-xs", "repo_type": "model", "private": True, "exist_ok": True}
    assert branch == {"repo_id": "me/tiny-xs", "branch": "v1", "repo_type": "model", "exist_ok": True}
    assert (upload["repo_id"], upload["repo_type"], upload["revision"]) == ("me/tiny-xs", "model", "v1")
    assert not Path(upload["folder_path"]).exists()  # the staging directory is gone
    assert sorted(api.uploaded) == ["README.md", "adapter.safetensors", "loraxs_config.json"]
    assert api.uploaded["adapter.safetensors"] == before["adapter.safetensors"]
    card = ModelCard(api.uploaded["README.md"].decode())
    assert card.data.base_model == "org/tiny" and "-a me/tiny-xs@v1" in card.text
    assert str(runs["root"]) not in card.content
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # the adapter is untouched

    # no --private, no --revision: the repo's default visibility, main, no branch made
    api.calls.clear()
    assert invoke("push", adapter, "me/tiny-xs").exit_code == 0
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is None and api.calls[1][1]["revision"] is None


def test_push_refuses_with_one_line_before_uploading(runs, tmp_path, monkeypatch):
    isolate(tmp_path / "hf", monkeypatch)
    adapter = runs["adapter"]
    api = RecordingApi(monkeypatch, private_repo=False)
    # HF_HUB_OFFLINE=1 (the tests' default)
    one_line_error(invoke("push", adapter, "me/x"), 3, "HF_HUB_OFFLINE is set", "--dry-run")
    online(monkeypatch, token=None)  # and no token file in the isolated HF_HOME
    one_line_error(
        invoke("push", adapter, "me/x"), 3, "needs a Hugging Face token", "hf auth login", "HF_TOKEN"
    )
    assert api.calls == []
    online(monkeypatch)
    one_line_error(
        invoke("push", adapter, "me/x", "--private"), 3, "exists and is public", "Nothing was uploaded"
    )
    assert [name for name, _ in api.calls] == ["create_repo", "repo_info"]
    one_line_error(invoke("push", adapter, "not a repo id"), 2, "not a Hugging Face repo id")
    one_line_error(invoke("push", runs["run"], "me/x"), 3, "a run directory", str(adapter))
    one_line_error(invoke("push", "a=b", "me/x"), 2, "push takes one adapter directory")


def test_push_without_network_is_one_line(runs, tmp_path, monkeypatch):
    """The real HfApi, whose HTTP client cannot connect: huggingface_hub's ConnectError, one line."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils._http import default_client_factory

    isolate(tmp_path / "hf", monkeypatch)
    online(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(request):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(unreachable)))
    try:
        result = invoke("push", runs["adapter"], "me/x")
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
    one_line_error(result, 3, "cannot be reached (ConnectError)", "Nothing was uploaded")
