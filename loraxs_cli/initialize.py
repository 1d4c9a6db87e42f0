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
from .errors import BadInputError
from .factors import SVDSettings, check_rank, compute_xs_factors
from .fingerprint import fingerprint
from .models import (
    LinearInfo,
    ResolvedModel,
    linear_modules,
    load_config,
    load_model,
    match_targets,
    parse_dtype,
    resolve_model,
    skeleton,
)
from .sb import DEFAULT_ETA

METHODS = ("xs", "sb")


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
    extra: dict = field(default_factory=dict)  # method-specific recipe fields (LoRA-SB)


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
    if request.method not in METHODS:
        raise BadInputError(f"unknown --method {request.method!r}: use xs or sb")
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
    compute: Callable[[FactorPlan, Callable | None], tuple[dict, dict]] | None = None,
) -> tuple[FactorEntry, bool]:
    """The plan's factor set from the cache (hit) or computed now (miss), and whether it was a hit.

    `compute(plan, on_module) -> (tensors, meta)` loads what it needs and defaults to LoRA-XS;
    LoRA-SB passes its own. It runs only on a miss, under the recipe's lock.
    """
    cache = cache or FactorCache()
    request = plan.request

    def run() -> tuple[dict, dict]:
        started = time.perf_counter()
        if on_start:
            on_start(len(plan.targets))
        tensors, meta = (compute or _compute_xs)(plan, on_module)
        meta.update(
            base={
                "spec": plan.base.resolved.spec,
                "slug": plan.base.slug,
                "fingerprint": plan.base.fingerprint,
                "model_type": plan.base.model_type,
                "repo_id": plan.base.resolved.repo_id,
                "commit": plan.base.resolved.commit,
            },
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


def _compute_xs(plan: FactorPlan, on_module) -> tuple[dict, dict]:
    from .models import backbone

    model = load_model(plan.base.resolved, head="base", dtype=plan.base.weights_dtype)
    result = compute_xs_factors(
        backbone(model),
        plan.targets,
        plan.request.rank,
        plan.request.svd,
        device=plan.request.device,
        on_module=on_module,
    )
    return result.tensors, {"stats": result.stats}


# ----------------------------------------------------------------------------------------------
# LoRA-SB: the recipe names the gradient sample; the compute step runs the gradient pass


@dataclass(frozen=True)
class OfficialEta:
    """The official LoRA-SB code's eta: `lr / (warmup_ratio * len(gradient_loader) * epochs)`.

    train_arithmetic.py, train_cr.py and train_glue.py compute it so; len(gradient_loader) is the
    number of batches of the training rows at the gradient pass's batch size (`--sb-batch-size`).
    """

    lr: float
    warmup_ratio: float | None
    epochs: float

    def eta(self, train_rows: int, batch_size: int) -> float:
        import math

        if not (self.warmup_ratio or 0) > 0:
            from .errors import UsageError

            raise UsageError("--sb-official-eta needs --warmup-ratio > 0 (eta = lr / (warmup_ratio * ...))")
        return self.lr / (self.warmup_ratio * math.ceil(train_rows / batch_size) * self.epochs)


@dataclass(frozen=True)
class SBInit:
    """Where LoRA-SB's approximated first step comes from. All but the memory budget are recorded."""

    data: str
    task: str
    samples: int = 64
    eta: float = DEFAULT_ETA
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    held_out_split: float = 0.0  # rows `train --eval-split` holds out are never in the sample
    max_grad_memory: int = 2 << 30  # bytes of gradient accumulators per pass (not part of the recipe)
    grad_mode: str = "eval"  # "train": dropout on during the pass, as the official code
    accum_dtype: str = "float32"  # "bfloat16": the official code's sums on a bf16 model
    step: str = "adam"  # "sign": the official -eta * sign(G)
    official_eta: OfficialEta | None = None  # set: eta comes from the training schedule instead


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GiB', '1.5G', '800MB' (binary units) or a plain byte count."""
    import re

    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
        if not match:
            raise BadInputError(f"not a memory size: {text!r} (use e.g. 512MiB or 2GiB)")
        size = int(float(match[1]) * (1 << (10 * " kmgt".index(match[2] or " "))))
    if size <= 0:
        raise BadInputError(f"memory size must be positive, got {text!r}")
    return size


def sb_request(
    request: FactorRequest, sb: SBInit, all_reduce: Callable | None = None, shard: tuple[int, int] = (0, 1)
) -> tuple[FactorRequest, Callable]:
    """The request with LoRA-SB's recipe fields, and the compute step for ensure_factors.

    `shard` = (rank, world) splits the sample across torchrun processes; `all_reduce` sums their
    accumulators so every process gets identical factors.
    """
    from dataclasses import replace

    from .data import check_task, file_sha256
    from .sb import GRAD_MODES, STEPS, SBSettings, parse_accum_dtype

    check_task(sb.task)
    if sb.samples <= 0 or sb.batch_size <= 0 or sb.max_length <= 0:
        raise BadInputError("LoRA-SB: --samples, --batch-size and --max-length must be positive")
    if sb.grad_mode not in GRAD_MODES:
        raise BadInputError(f"unknown --sb-grad-mode {sb.grad_mode!r}: use {' or '.join(GRAD_MODES)}")
    if sb.step not in STEPS:
        raise BadInputError(f"unknown --sb-step {sb.step!r}: use {' or '.join(STEPS)}")
    sb = replace(sb, accum_dtype=parse_accum_dtype(sb.accum_dtype))
    rows, labels, train_rows = _sb_rows(sb)
    if sb.official_eta is not None:
        sb = replace(sb, eta=sb.official_eta.eta(train_rows, sb.batch_size))
    if not sb.eta > 0:
        raise BadInputError(f"LoRA-SB: --sb-lr must be positive, got {sb.eta}")
    settings = SBSettings(eta=sb.eta, step=sb.step)
    extra = {
        "data_sha256": file_sha256(sb.data),
        "samples": len(rows),
        "task": sb.task,
        "labels": labels,
        "seed": sb.seed,
        "batch_size": sb.batch_size,
        "max_length": sb.max_length,
        "held_out_split": sb.held_out_split,
        **settings.as_dict(),
        # Recorded only when not the default: the recipes (cache entries) of the defaults are unchanged.
        **({"grad_mode": sb.grad_mode} if sb.grad_mode != "eval" else {}),
        **({"accum_dtype": sb.accum_dtype} if sb.accum_dtype != "float32" else {}),
    }

    def compute(plan: FactorPlan, on_module) -> tuple[dict, dict]:
        return _compute_sb(plan, sb, rows, labels, settings, all_reduce, shard, on_module, train_rows)

    return replace(request, method="sb", extra={"sb": extra}), compute


def _sb_rows(sb: SBInit) -> tuple[list, list[str] | None, int]:
    """The seeded gradient sample (`samples` rows of the training part of the data), the label names,
    and the number of training rows."""
    import random

    from .data import label_names, read_rows, stratified_split

    rows = read_rows(sb.data)
    labels = label_names(rows, sb.task)
    if sb.held_out_split:
        rows, _ = stratified_split(rows, sb.held_out_split, sb.seed, sb.task)
    chosen = sorted(random.Random(sb.seed).sample(range(len(rows)), min(sb.samples, len(rows))))
    return [rows[i] for i in chosen], labels, len(rows)


def _compute_sb(plan, sb: SBInit, rows, labels, settings, all_reduce, shard, on_module, train_rows):
    from .data import collate, encode, pad_id_of
    from .models import backbone, head_kwargs, load_tokenizer
    from .sb import ACCUM_DTYPES, average_gradients, plan_groups, sb_factors

    tokenizer = load_tokenizer(plan.base.resolved)
    examples = encode(rows, tokenizer, sb.task, max_length=sb.max_length, labels=labels)
    rank, world = shard
    mine = examples[rank::world]
    torch.manual_seed(sb.seed)  # the same fresh task head that `train --seed` starts from
    model = load_model(plan.base.resolved, dtype=plan.base.weights_dtype, **head_kwargs(sb.task, labels))
    device = torch.device(plan.request.device or "cpu")
    model.to(device)
    pad_id = pad_id_of(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id

    def batches():
        for start in range(0, len(mine), sb.batch_size):
            batch = collate(mine[start : start + sb.batch_size], pad_id, sb.task)
            yield {k: v.to(device) for k, v in batch.items()}

    core = backbone(model)
    accum_dtype = ACCUM_DTYPES[sb.accum_dtype]
    gradients = average_gradients(
        model,
        core,
        plan.targets,
        batches,
        budget_bytes=sb.max_grad_memory,
        all_reduce=all_reduce,
        mode=sb.grad_mode,
        accum_dtype=accum_dtype,
        seed=sb.seed,
    )
    tensors, stats = sb_factors(gradients, core, plan.request.rank, settings, plan.request.svd, on_module)
    element_bytes = torch.empty((), dtype=accum_dtype).element_size()
    groups = len(plan_groups(plan.base.shapes(plan.targets), sb.max_grad_memory, element_bytes))
    record = {
        "examples": len(examples),
        "gradient_passes": groups,
        "grad_mode": sb.grad_mode,
        "accum_dtype": sb.accum_dtype,
        "step": settings.step,
        "eta": settings.eta,
    }
    if sb.official_eta is not None:
        record["eta_from"] = {
            "rule": "lr / (warmup_ratio * ceil(train_rows / batch_size) * epochs)",
            "lr": sb.official_eta.lr,
            "warmup_ratio": sb.official_eta.warmup_ratio,
            "epochs": sb.official_eta.epochs,
            "train_rows": train_rows,
            "batch_size": sb.batch_size,
        }
    return tensors, {"stats": stats, "sb": record}
