"""What a factor method is: the interface every room in `methods/` fills in (see methods/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# compute(plan, on_module) -> (tensors, meta): what `initialize.ensure_factors` runs on a cache miss
Compute = Callable[[Any, Callable[[str], None] | None], tuple[dict, dict]]


class Method:
    """One way of computing the frozen factors B, A (and R0) of an adapter, and what follows from it.

    A method owns: its recipe fields (what goes into the factor id, the cache entry and the adapter
    config), how the factors are computed, the initial R, the scaling, its defaults, how it describes
    itself (`cache ls`, `inspect`, the dry-run plan) and the `loraxs init` words that recompute it.
    """

    name: str = ""  # the recorded `method` field: "xs" | "sb"
    title: str = ""  # "LoRA-XS" | "LoRA-SB"
    card_tag: str = ""  # the model-card tag of a merged model
    adapter_tags: tuple[str, ...] = ()  # the model-card tags of an adapter (after "loraxs")
    factor_of: str = "W"  # what the factors are a truncated SVD of (energy tables)
    needs_data: bool = False  # the factors come from a gradient pass on training data
    collective: bool = False  # under torchrun every process runs its share of the compute
    defaults: Any = None

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # ------------------------------------------------------------------ the math

    def scaling(self, rank: int, alpha: float | None) -> float:
        """s of h = W x + s B R A x: alpha / r, alpha defaulting to r (s = 1)."""
        return (alpha if alpha is not None else rank) / rank

    def adapter_alpha(self, rank: int, alpha: float | None) -> float:
        """The alpha an adapter config records (its scaling is alpha / rank)."""
        return float(rank if alpha is None else alpha)

    def initial_R(self, factors: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """R0 per module from the loaded factors; None: inject's random N(0, init_std^2)."""
        return None

    def prepare(self, request, settings=None, *, all_reduce=None, shard=(0, 1)) -> tuple[Any, Compute | None]:
        """The factor request with this method's recipe fields, and its compute step for
        `ensure_factors(plan, compute=...)` (None: the default, this method's `compute`)."""
        raise NotImplementedError

    def compute(self, plan, on_module=None) -> tuple[dict, dict]:
        """The factor tensors and the entry's meta (stats, ...) for a plan of this method."""
        raise NotImplementedError

    # ------------------------------------------------------------------ what it records

    def record(self, recipe_extra: dict | None) -> dict | None:
        """This method's recorded recipe fields from a recipe's `extra` (None: it records none)."""
        return None

    def adapter_extra(self, recipe_extra: dict | None) -> dict:
        """What an adapter config's `extra` carries over from its factor recipe."""
        return {}

    # ------------------------------------------------------------------ how it says so

    def describe(self, record: dict | None, style: str = "cache") -> str:
        """The recorded recipe fields in words ("" when none): style "cache" (`cache ls`) or "inspect"."""
        return ""

    def plan_fields(self, plan, grad_budget: int | None) -> dict:
        """Extra fields of the `init --dry-run` plan document."""
        return {}

    def memory_text(self, doc: dict) -> str:
        """The `init --dry-run` memory line, from the plan document."""
        return f"base weights in {doc['base_dtype']} + one weight in float32 at a time"

    def recompute_args(self, record: dict | None, task: str | None) -> list[str]:
        """The words after `loraxs init MODEL --rank R --targets ... [--svd ...]` that redo the factors."""
        return []

    def data_note(self, record: dict | None) -> str:
        """The note after the recompute command on what it needs besides the base ("" when nothing)."""
        return ""
