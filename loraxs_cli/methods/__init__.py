"""Factor methods as rooms: LoRA-XS (xs.py) and LoRA-SB (sb.py) behind one small registry.

Each method holds its recipe fields, how its factors are computed, its initial R and scaling, its
defaults (method_defaults.py, torch-free for the CLI), how it describes itself and the `loraxs init`
words that recompute its factors. Code elsewhere asks the method instead of testing `method == "sb"`.
"""

from __future__ import annotations

from ..errors import BadInputError, LoraxsError
from .base import Compute, Method
from .sb import SB
from .xs import XS

__all__ = ["METHODS", "METHOD_NAMES", "SB", "XS", "Compute", "Method", "get_method", "method_of"]

METHODS: dict[str, Method] = {m.name: m for m in (XS, SB)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str, error: type[LoraxsError] = BadInputError) -> Method:
    """The method called `name`; `error` (a one-line user error) when there is none."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise error(f"unknown --method {name!r}: use {' or '.join(METHOD_NAMES)}")
    return method


def method_of(name: str | None, recipe_extra: dict | None = None) -> Method:
    """The method of a recorded config or entry, leniently: the one whose recipe fields `recipe_extra`
    holds, else the one called `name`, else LoRA-XS (old or hand-made records are read, not refused)."""
    for method in METHODS.values():
        if method.record(recipe_extra):
            return method
    return METHODS.get(name, XS) if isinstance(name, str) else XS
