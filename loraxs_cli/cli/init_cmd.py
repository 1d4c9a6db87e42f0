"""`loraxs init MODEL --rank R`: compute the frozen factors once into the shared cache."""

from __future__ import annotations

import typer

from ..method_defaults import SB_DEFAULTS
from .options import (
    AT_LEAST_ONE,
    SEED,
    JsonOption,
    MethodOption,
    ModelArgument,
    NiterOption,
    OversampleOption,
    QuietOption,
    SbAccumDtypeOption,
    SbGradModeOption,
    SbLrOption,
    SbStepOption,
    SbTaskOption,
    SvdDeviceOption,
    SvdOption,
    TargetsOption,
    VerboseOption,
    WeightsDtypeOption,
)
from .output import Output, get_output, handle_errors, styled
from .render import Fields, bytes_human, energy_table


@handle_errors
def init(
    ctx: typer.Context,
    model: ModelArgument,
    rank: int = typer.Option(
        ..., "--rank", "-r", help="Rank r of the factors (adapters use r x r numbers per module)."
    ),
    targets: TargetsOption = None,
    method: MethodOption = "xs",
    svd: SvdOption = "torch",
    niter: NiterOption = None,
    oversample: OversampleOption = None,
    seed: int = typer.Option(
        0,
        "--seed",
        callback=SEED,
        help="Seed of the SVD's own generator (sklearn: random_state 42 + seed) and the sample.",
    ),
    device: SvdDeviceOption = None,
    dtype: WeightsDtypeOption = "auto",
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="LoRA-SB: training data whose sample gradient sets the factors."
    ),
    task: SbTaskOption = "causal-lm",
    samples: int = typer.Option(
        SB_DEFAULTS.samples,
        "--samples",
        callback=AT_LEAST_ONE,
        help="LoRA-SB: examples in the gradient sample.",
    ),
    sb_lr: SbLrOption = SB_DEFAULTS.eta,
    sb_step: SbStepOption = SB_DEFAULTS.step,
    sb_grad_mode: SbGradModeOption = SB_DEFAULTS.grad_mode,
    sb_accum_dtype: SbAccumDtypeOption = SB_DEFAULTS.accum_dtype,
    batch_size: int = typer.Option(
        SB_DEFAULTS.batch_size,
        "--batch-size",
        "-b",
        callback=AT_LEAST_ONE,
        help="LoRA-SB: batch size of the gradient pass.",
    ),
    max_length: int = typer.Option(
        SB_DEFAULTS.max_length, "--max-length", callback=AT_LEAST_ONE, help="LoRA-SB: tokens per example."
    ),
    max_grad_memory: str = typer.Option(
        SB_DEFAULTS.max_grad_memory,
        "--max-grad-memory",
        help="LoRA-SB: gradient accumulators per pass (more: groups).",
    ),
    force: bool = typer.Option(False, "--force", help="Recompute even when the cache has the entry."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (hit or miss, sizes, memory) and exit."
    ),
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Compute LoRA-XS factors for MODEL (or serve them from the cache)."""
    out = get_output(ctx)
    from ..factors import SVDSettings
    from ..initialize import FactorRequest, ensure_factors, parse_bytes, plan_factors
    from ..methods import get_method
    from ..models import parse_targets

    request = FactorRequest(
        model=model,
        rank=rank,
        targets=parse_targets(targets),
        method=method,
        svd=SVDSettings.for_backend(svd, niter, oversample, seed),
        dtype=dtype,
        device=device,
        revision=revision,
    )
    chosen = get_method(method)
    if chosen.needs_data:
        request, compute = _sb_request(request, data, task, samples, sb_lr, batch_size, max_length, seed,
                                       max_grad_memory, sb_step, sb_grad_mode, sb_accum_dtype)  # fmt: skip
    elif data is not None:
        from ..errors import UsageError

        raise UsageError("--data is for --method sb (LoRA-XS factors come from the weights alone)")
    else:
        request, compute = chosen.prepare(request)
    out.detail(f"resolving {model}")
    plan = plan_factors(request, allow_preset=dry_run)  # a preset name plans from its shapes
    if dry_run:
        _render_plan(out, plan, parse_bytes(max_grad_memory) if chosen.needs_data else None)
        return
    with out.progress("SVD", total=len(plan.targets)) as advance:
        entry, hit = ensure_factors(
            plan,
            force=force,
            on_start=lambda n: out.info(f"cache miss: computing {n} factor pairs at rank {rank}"),
            on_module=lambda name: advance(status=name),
            compute=compute,
        )
    _render_entry(out, plan, entry, hit)


def _sb_request(request, data, task, samples, sb_lr, batch_size, max_length, seed, max_grad_memory,
                sb_step, sb_grad_mode, sb_accum_dtype):  # fmt: skip
    from ..errors import UsageError
    from ..methods import SB
    from ..methods.sb import SBInit, parse_bytes

    if data is None:
        raise UsageError("--method sb needs --data: LoRA-SB factors come from a gradient on training data")
    sb = SBInit(
        data=data,
        task=task,
        samples=samples,
        eta=sb_lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        max_grad_memory=parse_bytes(max_grad_memory),
        grad_mode=sb_grad_mode,
        accum_dtype=sb_accum_dtype,
        step=sb_step,
    )
    return SB.prepare(request, sb)


def _render_plan(out: Output, plan, grad_budget: int | None) -> None:
    base = plan.base
    doc = {
        "dry_run": True,
        "model": base.resolved.spec,
        "fingerprint": base.fingerprint,
        "model_type": base.model_type,
        "method": plan.request.method,
        "rank": plan.request.rank,
        "modules": len(plan.targets),
        "cache": "none" if base.preset else "hit" if plan.entry else "miss",
        "entry": plan.entry.id if plan.entry else None,
        "preset": base.preset,
        "factor_bytes": plan.factor_bytes,
        "target_weight_bytes": plan.target_weight_bytes,
        "base_params": base.total_params,
        "base_dtype": str(base.weights_dtype).removeprefix("torch."),
    }
    from ..methods import get_method

    # The method's own fields: LoRA-XS's planned peak memory; LoRA-SB's recipe fields and gradient-pass
    # arithmetic (methods/sb.py)
    doc.update(get_method(plan.request.method).plan_fields(plan, grad_budget))

    out.result(doc, _plan_view)


def _render_entry(out: Output, plan, entry, hit: bool) -> None:
    rank = plan.request.rank
    from ..factors import captured_energy

    stats = entry.meta.get("stats", {})
    modules = [
        {"name": name, "shape": stats[name]["shape"], "energy": captured_energy(stats[name], rank)}
        for name in plan.targets
        if name in stats
    ]
    doc = {
        "model": plan.base.resolved.spec,
        "fingerprint": plan.base.fingerprint,
        "cache": "hit" if hit else "miss",
        "entry": entry.id,
        "path": str(entry.path),
        "method": entry.meta["method"],
        "rank": rank,
        "r_max": entry.r_max,
        "sha256": entry.sha256,
        "seconds": entry.meta.get("seconds"),
        "modules": modules,
        "sb": entry.meta.get("recipe", {}).get("extra", {}).get("sb"),
    }

    out.result(doc, lambda doc: _entry_view(doc, full=out.verbosity > 0))


def _plan_view(doc: dict) -> Fields:
    hit = f"hit ({doc['entry']})" if doc["cache"] == "hit" else "miss: factors would be computed"
    if doc.get("preset"):
        hit = f"none: {doc['preset']} is a built-in preset (shapes only; init needs the model's weights)"
    from ..methods import get_method

    memory = get_method(doc["method"]).memory_text(doc)
    heading = styled(
        "[bold]{}[/] ({}, {} parameters)", doc["model"], doc["model_type"], f"{doc['base_params']:,}"
    )
    return Fields(
        heading,
        [
            ("cache", hit),
            ("modules", f"{doc['modules']} at rank {doc['rank']}"),
            ("factors", f"{bytes_human(doc['factor_bytes'])} on disk (float32)"),
            ("memory", memory),
        ],
    )


def _entry_view(doc: dict, *, full: bool) -> list:
    from ..methods import method_of

    of = method_of(doc["method"]).factor_of
    modules, rank = doc["modules"], doc["rank"]
    verb = "served from the cache" if doc["cache"] == "hit" else f"computed in {doc['seconds'] or 0:.1f} s"
    return [
        energy_table(modules, rank=rank, r_max=doc["r_max"], full=full, of=of),
        styled("{} factor pairs at rank {} {}: [bold]{}[/]", len(modules), rank, verb, doc["path"]),
    ]
