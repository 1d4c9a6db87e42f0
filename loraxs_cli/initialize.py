"""`init`: plan a factor set for a base (without loading weights), then serve it from the cache or compute it.

Planning builds the model on the meta device from its config, so target matching, rank checks
and the dry-run plan cost no weight I/O, and a cache hit never loads the model at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import FactorCache, FactorEntry, Recipe, get_or_compute
from .devices import check_device
from .errors import BadInputError, UsageError
from .estimate import Preset, find_preset
from .factors import SVDSettings, check_rank
from .fingerprint import base_record, fingerprint
from .methods import METHOD_NAMES, XS, Compute, get_method
from .methods.sb import OfficialEta, SBInit, parse_bytes, sb_request  # noqa: F401 - re-exported (train, tests)
from .models import (
    ALL_LINEAR,
    LinearInfo,
    ResolvedModel,
    linear_modules,
    load_config,
    match_targets,
    parse_dtype,
    parse_targets,
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
    fingerprint: str | None  # None: a preset
    config: object
    model_type: str
    modules: dict[str, LinearInfo]
    weights_dtype: torch.dtype
    total_params: int
    stored_dtype: torch.dtype | None = None  # the checkpoint's own dtype (GGUF: float32, dequantized)
    preset: str | None = None  # a built-in preset's name (estimate.PRESETS): shapes only, no weights

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


def describe_base(
    spec: str | ResolvedModel, revision: str | None = None, dtype: str | None = None
) -> BaseInfo:
    """Resolve, fingerprint and enumerate a base model without reading its weights into memory."""
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec, revision)
    config = load_config(resolved)
    meta_model = skeleton(config)
    stored_dtype = torch.float32 if resolved.gguf_file else _checkpoint_dtype(config)
    weights_dtype = parse_dtype(dtype) or _checkpoint_dtype(config)
    return BaseInfo(
        resolved,
        fingerprint(resolved),
        config,
        config.model_type,
        linear_modules(meta_model),
        weights_dtype,
        total_params=sum(p.numel() for p in meta_model.parameters()),
        stored_dtype=stored_dtype,
    )


def _checkpoint_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.float32


def plan_factors(
    request: FactorRequest, cache: FactorCache | None = None, *, allow_preset: bool = False
) -> FactorPlan:
    """The plan of a request. A MODEL that resolves to no model but names a built-in preset
    (estimate.PRESETS) plans from the preset's shapes with `allow_preset` (`init --dry-run`) and is
    refused without (there are no weights to compute factors of)."""
    get_method(request.method)  # an unknown method is refused before any work
    check_device(request.device)
    try:
        resolved = resolve_model(request.model, request.revision)
    except BadInputError:
        preset = preset_named(request.model)
        if preset is None:
            raise
        if not allow_preset:
            raise UsageError(
                f"{request.model} is a built-in preset ({preset.name}: shapes only, no weights); "
                f"`loraxs init {request.model} --dry-run` plans it, computing factors needs the model "
                "itself (a directory, a .gguf file or a Hugging Face id)"
            ) from None
        return _preset_plan(request, preset)
    base = describe_base(resolved, request.revision, request.dtype)
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


def preset_named(spec: str) -> Preset | None:
    """The built-in preset a MODEL names (None for an existing path, as `inspect` decides)."""
    return None if Path(spec).expanduser().exists() else find_preset(spec)


# A preset records no dtype: the papers' decoders are published in bfloat16, RoBERTa in float32.
PRESET_DTYPE = torch.bfloat16
PRESET_DTYPES = {"RoBERTa-base": torch.float32, "RoBERTa-large": torch.float32}


def _preset_plan(request: FactorRequest, preset: Preset) -> FactorPlan:
    """A dry-run plan from a preset's shape table: no files, no fingerprint, no cache entry."""
    names = parse_targets(list(request.targets)) if request.targets else None
    shapes = preset.shapes(names)
    every = preset.shapes([ALL_LINEAR])
    modules = {s.name: LinearInfo(s.name, s.out_features, s.in_features, False) for s in every}
    dtype = parse_dtype(request.dtype) or PRESET_DTYPES.get(preset.name, PRESET_DTYPE)
    base = BaseInfo(
        resolved=ResolvedModel(request.model, "preset", Path(preset.name)),
        fingerprint=None,
        config=None,
        model_type="preset",
        modules=modules,
        weights_dtype=dtype,
        total_params=preset.total_params,
        stored_dtype=dtype,
        preset=preset.name,
    )
    targets = [s.name for s in shapes]
    check_rank(request.rank, base.shapes(targets))
    recipe = Recipe(
        method=request.method,
        modules=tuple(targets),
        svd=request.svd.as_dict(),
        weights_dtype=str(dtype).removeprefix("torch."),
        extra=request.extra,
    )
    return FactorPlan(request, base, targets, recipe, None)


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
