"""`init`: plan a factor set for a base (without loading weights), then serve it from the cache or compute it.

Planning builds the model on the meta device from its config, so target matching, rank checks
and the dry-run plan cost no weight I/O, and a cache hit never loads the model at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cache import FactorCache, FactorEntry, Recipe, get_or_compute
from .devices import check_device
from .factors import SVDSettings, check_rank
from .fingerprint import base_record, fingerprint
from .methods import METHOD_NAMES, XS, Compute, get_method
from .methods.sb import OfficialEta, SBInit, parse_bytes, sb_request  # noqa: F401 - re-exported (train, tests)
from .models import (
    LinearInfo,
    ResolvedModel,
    linear_modules,
    load_config,
    match_targets,
    parse_dtype,
    resolve_model,
    skeleton,
)

METHODS = METHOD_NAMES  # the method names (the method objects: methods.METHODS)


@dataclass
class FactorRequest:
    model: str
    rank: int
    targets: Sequence[str] | None = None
    method: str = "xs"
    svd: SVDSettings = field(default_factory=SVDSettings)
    dtype: str | None = None  # dtype the base weights are read in ("auto": the checkpoint's)
    device: str | None = None
    revision: str | None = None
    extra: dict = field(default_factory=dict)  # method-specific recipe fields (methods/: LoRA-SB's)


@dataclass
class BaseInfo:
    """A resolved base model, its identity and its linear modules, from the config alone."""

    resolved: ResolvedModel
    fingerprint: str
    config: object
    model_type: str
    modules: dict[str, LinearInfo]
    weights_dtype: torch.dtype
    total_params: int

    @property
    def slug(self) -> str:
        return self.resolved.slug

    def shapes(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        return {n: (self.modules[n].out_features, self.modules[n].in_features) for n in names}


@dataclass
class FactorPlan:
    request: FactorRequest
    base: BaseInfo
    targets: list[str]
    recipe: Recipe
    entry: FactorEntry | None  # set on a cache hit

    @property
    def factor_bytes(self) -> int:
        r = self.request.rank
        return sum(r * (m + n) * 4 for m, n in self.base.shapes(self.targets).values())

    @property
    def target_weight_bytes(self) -> int:
        item = torch.empty((), dtype=self.base.weights_dtype).element_size()
        return sum(m * n * item for m, n in self.base.shapes(self.targets).values())


def describe_base(spec: str, revision: str | None = None, dtype: str | None = None) -> BaseInfo:
    """Resolve, fingerprint and enumerate a base model without reading its weights into memory."""
    resolved = resolve_model(spec, revision)
    config = load_config(resolved)
    meta_model = skeleton(config)
    weights_dtype = parse_dtype(dtype) or _checkpoint_dtype(config)
    return BaseInfo(
        resolved,
        fingerprint(resolved),
        config,
        config.model_type,
        linear_modules(meta_model),
        weights_dtype,
        total_params=sum(p.numel() for p in meta_model.parameters()),
    )


def _checkpoint_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.float32


def plan_factors(request: FactorRequest, cache: FactorCache | None = None) -> FactorPlan:
    get_method(request.method)  # an unknown method is refused before any work
    check_device(request.device)
    base = describe_base(request.model, request.revision, request.dtype)
    targets = match_targets(base.modules, request.targets, base.model_type)
    check_rank(request.rank, base.shapes(targets))
    recipe = Recipe(
        method=request.method,
        modules=tuple(targets),
        svd=request.svd.as_dict(),
        weights_dtype=str(base.weights_dtype).removeprefix("torch."),
        extra=request.extra,
    )
    cache = cache or FactorCache()
    entry = cache.find(base.slug, base.fingerprint, recipe, request.rank)
    return FactorPlan(request, base, targets, recipe, entry)


def ensure_factors(
    plan: FactorPlan,
    cache: FactorCache | None = None,
    *,
    force: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_module: Callable[[str], None] | None = None,
    compute: Compute | None = None,
) -> tuple[FactorEntry, bool]:
    """The plan's factor set from the cache (hit) or computed now (miss), and whether it was a hit.

    `compute(plan, on_module) -> (tensors, meta)` loads what it needs: the one `Method.prepare` gives
    (LoRA-SB's gradient pass), else the method's own (LoRA-XS). It runs only on a miss, under the
    recipe's lock.
    """
    cache = cache or FactorCache()
    request = plan.request

    def run() -> tuple[dict, dict]:
        started = time.perf_counter()
        if on_start:
            on_start(len(plan.targets))
        tensors, meta = (compute or _default_compute(plan))(plan, on_module)
        meta.update(
            base=base_record(plan.base),
            seconds=round(time.perf_counter() - started, 3),
            device=str(request.device or "cpu"),
        )
        return tensors, meta

    entry, hit = get_or_compute(
        cache, plan.base.slug, plan.base.fingerprint, plan.recipe, request.rank, run, force=force
    )
    if hit:
        entry.check()
    return entry, hit


def _default_compute(plan: FactorPlan) -> Compute:
    method = get_method(plan.request.method)
    return _compute_xs if method is XS else method.compute


def _compute_xs(plan: FactorPlan, on_module) -> tuple[dict, dict]:
    """LoRA-XS's compute (a module-level name: tests wrap it to slow a compute down)."""
    return XS.compute(plan, on_module)
