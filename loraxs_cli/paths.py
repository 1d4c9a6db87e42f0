"""Where loraxs keeps its files: `$LORAXS_HOME` (default `~/.cache/loraxs`)."""

from __future__ import annotations

import os
from pathlib import Path


def loraxs_home() -> Path:
    home = os.environ.get("LORAXS_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraxs"


def factors_root() -> Path:
    return loraxs_home() / "factors"
