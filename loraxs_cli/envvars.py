"""Environment variables loraxs reads, parsed in one place: a bad value is a one-line error (exit 3)
that names the variable, read when it is needed (never at import, where it would crash every command)."""

from __future__ import annotations

import math
import os

from .errors import BadInputError


def env_number(name: str, default: float, *, minimum: float = 0.0, unit: str = "") -> float:
    """A finite number >= `minimum` from `$name` (unset or blank: `default`)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        what = f"a number{f' of {unit}' if unit else ''} >= {minimum:g}"
        raise BadInputError(f"{name}={raw!r} is not {what}; fix or unset it (default {default:g})")
    return value


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    """An integer >= `minimum` from `$name` (unset or blank: `default`); WORLD_SIZE, LOCAL_RANK."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise BadInputError(f"{name}={raw!r} is not an integer >= {minimum}; fix or unset it")
    return value
