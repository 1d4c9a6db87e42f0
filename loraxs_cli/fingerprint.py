"""Base-model fingerprints: a short id that changes whenever any weight changes.

From the Hugging Face cache the blob names already are the LFS sha256 of each shard, so nothing
is re-hashed. Local files are hashed once and the result is remembered, keyed by path, size and
mtime, in `$LORAXS_HOME/fingerprints.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from filelock import FileLock

from .fsutil import loads_json, require_regular_file, write_text_atomic
from .models import ResolvedModel, weight_files
from .paths import loraxs_home

_SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a regular file (a FIFO or device is refused before it is opened: it would block)."""
    digest = hashlib.sha256()
    with open(require_regular_file(path, "weights file"), "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _memo_path() -> Path:
    return loraxs_home() / "fingerprints.json"


def _cached_file_sha256(path: Path) -> str:
    """sha256 of a weight file, remembered by (path, size, mtime_ns) so it is computed once."""
    stat = require_regular_file(path, "weights file").stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = _memo_path()
    memo = _read_memo(memo_file)
    if key in memo:
        return memo[key]
    value = sha256_file(path)
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(memo_file) + ".lock", timeout=60):
            memo = _read_memo(memo_file)
            memo[key] = value
            write_text_atomic(memo_file, json.dumps(memo, indent=0, sort_keys=True))
    except OSError:
        pass  # the memo only saves time; an unwritable home must not stop the command
    return value


def _read_memo(path: Path) -> dict[str, str]:
    try:
        data = loads_json(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _hub_blob_sha256(path: Path) -> str | None:
    """In an HF cache snapshot, weight files link to blobs/<sha256> (the LFS oid)."""
    if not path.is_symlink():
        return None
    name = Path(os.readlink(path)).name
    return name if _SHA256.fullmatch(name) else None


def fingerprint(resolved: ResolvedModel) -> str:
    """16 hex chars identifying the exact weights (plus the commit for hub snapshots)."""
    parts: dict[str, str] = {}
    for path in weight_files(resolved):
        sha = _hub_blob_sha256(path) if resolved.kind == "hub" else None
        parts[path.name] = sha or _cached_file_sha256(path)
    if resolved.commit:
        parts["commit"] = resolved.commit
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def base_record(base) -> dict:
    """How adapters, factor sets and imports record their base (an initialize.BaseInfo): what the
    user named, the cache slug, the fingerprint, the model type and, from the hub, repo and commit.
    `hub_id`/`hub_commit` name the Hub repo also for a path into huggingface_hub's cache (a snapshot
    directory), which resolves as a local directory: model cards name the base by it."""
    hub = base.resolved.hub_source or (None, None)
    return {
        "spec": base.resolved.spec,
        "slug": base.slug,
        "fingerprint": base.fingerprint,
        "model_type": base.model_type,
        "repo_id": base.resolved.repo_id,
        "commit": base.resolved.commit,
        "hub_id": hub[0],
        "hub_commit": hub[1],
    }
