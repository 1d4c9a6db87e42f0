"""Where loraxs keeps its files: `$LORAXS_HOME` (default `~/.cache/loraxs`)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def loraxs_home() -> Path:
    home = os.environ.get("LORAXS_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraxs"


def factors_root() -> Path:
    return loraxs_home() / "factors"


NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS)


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """A unique hidden sibling of `path` to write first and rename into place:
    `.NAME.tmp-PID-HEX` beside NAME (`kind` "old": the earlier one moved aside, `.NAME.old-HEX`).

    The name is cut to fit the 255-byte limit of one file name, the cut part replaced by a hash of
    the whole name, so an output name the user gave near the limit still gets its temporary twin.
    """
    target = Path(path)
    name = target.name
    suffix = (
        f".{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if kind == "tmp"
        else f".{kind}-{uuid.uuid4().hex[:6]}"
    )
    room = NAME_MAX - 1 - len(suffix.encode())  # 1: the leading dot
    encoded = name.encode()
    if len(encoded) > room:
        digest = "~" + hashlib.sha256(encoded).hexdigest()[:12]
        name = encoded[: room - len(digest)].decode(errors="ignore") + digest
    return target.with_name(f".{name}{suffix}")


def split_name(spec: str) -> tuple[str | None, str]:
    """(NAME, SOURCE) for `NAME=SOURCE`, else (None, spec).

    A spec that is an existing path is a path (`a=b`, a directory). Otherwise `X=Y` names Y when X is
    a valid name (not empty, no '/', '\\' or '::', not starting with '__') or when Y exists (then the
    caller's own check of the name says what is wrong with it); `runs/lr=1e-3/adapter` is a path.
    """
    name, eq, source = spec.partition("=")
    if not eq or not source or Path(spec).exists():
        return None, spec
    valid = bool(name) and not any(mark in name for mark in ("/", "\\", "::")) and not name.startswith("__")
    if valid or Path(source).exists():
        return name, source
    return None, spec
