"""A stand-in for the Hugging Face Hub inside the test process, so that huggingface_hub itself writes its
cache: its own HTTP client (huggingface_hub.set_client_factory) gets an httpx2.MockTransport that answers
the four requests snapshot_download makes (the revision's info, the tree listing, HEAD and GET of each
file's /resolve URL) from folders registered here. What lands in HF_HUB_CACHE (refs/, snapshots/<commit>/
links into blobs/, the tree listing) is then the library's own layout, which offline resolution reads
and huggingface_hub.scan_cache_dir recognises; no hand-written cache."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class FakeHub:
    """Model repos: repo id -> {commit: {file name: bytes}}, and their branches -> commit."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []

    def add(self, repo_id: str, folder: Path, *, branch: str = "main") -> str:
        """Commit the regular files of `folder` to `branch` of `repo_id`; returns the commit id."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        digest = hashlib.sha1(repo_id.encode())
        for name, data in files.items():
            digest.update(name.encode() + hashlib.sha256(data).digest())
        commit = digest.hexdigest()
        self.commits.setdefault(repo_id, {})[commit] = files
        self.refs.setdefault(repo_id, {})[branch] = commit
        return commit

    def _files(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        commit = self.refs.get(repo_id, {}).get(revision, revision)
        files = self.commits.get(repo_id, {}).get(commit)
        return None if files is None else (commit, files)

    def handle(self, request):
        import httpx2

        path = request.url.path
        self.requests.append((request.method, path))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = info or tree or resolve
        found = self._files(match[1], match[2]) if match else None
        if found is None:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "not found"})
        commit, files = found
        if info:
            siblings = [{"rfilename": name} for name in files]
            return httpx2.Response(200, json={"id": match[1], "sha": commit, "siblings": siblings})
        if tree:
            return httpx2.Response(200, json=[_tree_entry(name, data) for name, data in files.items()])
        name = match[3]
        if name not in files:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        data = files[name]
        etag = f'"{_etag(name, data)}"'
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Content-Length": str(len(data))}
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs(name: str) -> bool:
    return name.endswith(".safetensors")


def _etag(name: str, data: bytes) -> str:
    """The Hub's ETag: the LFS sha256 for a weights file, the git blob sha1 for the rest."""
    return hashlib.sha256(data).hexdigest() if _lfs(name) else _git_sha1(data)


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {"type": "file", "path": name, "size": len(data), "oid": _git_sha1(data)}
    if _lfs(name):
        entry["lfs"] = {"oid": _etag(name, data), "size": len(data), "pointerSize": 134}
    return entry


def isolate(home: Path, monkeypatch) -> Path:
    """huggingface_hub's files under `home` for this test: HF_HOME, and the paths it computed from it
    at import (the cache, the token files, its agent registry), so nothing reaches ~/.cache/huggingface.
    Returns the hub cache."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HOME", str(home))
    for name, path in {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        "AGENT_HARNESSES_PATH": home / ".agent_harnesses.json",
    }.items():
        monkeypatch.setattr(constants, name, str(path))
    return home / "hub"


@contextmanager
def serving(hub: FakeHub, monkeypatch) -> Iterator[FakeHub]:
    """huggingface_hub talks to `hub` (online: HF_HUB_OFFLINE off for the block), then to the real
    network again. Its own request hook stays in, so its offline switch works as it does for real."""
    import httpx2
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    def client() -> httpx2.Client:
        return httpx2.Client(
            transport=httpx2.MockTransport(hub.handle),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
        )

    with monkeypatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.delenv("HF_HUB_OFFLINE", raising=False)
        huggingface_hub.set_client_factory(client)
        try:
            yield hub
        finally:
            huggingface_hub.set_client_factory(default_client_factory)


def describe(path: Path) -> str:
    """For a failed assertion: the cache tree as huggingface_hub left it."""
    return json.dumps(sorted(str(p.relative_to(path)) for p in Path(path).rglob("*")), indent=0)
