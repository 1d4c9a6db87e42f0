"""`loraxs init MODEL --rank R`: compute the frozen factors once into the shared cache."""

from __future__ import annotations

from typing import Literal

import typer

from .options import (
    AT_LEAST_ONE,
    EVERY,
    POSITIVE,
    SEED,
    SVD_HELP,  # noqa: F401 - re-exported for train_cmd's --svd help
    MethodOption,
    SvdOption,
    Task,
    WeightsDtypeOption,
)
from .output import Output, get_output, handle_errors, styled
from .render import bytes_human, energy_table

TARGETS_HELP = (
    "Comma-separated module names, dotted suffixes or globs, or 'all-linear'. Default: per architecture."
)
SB_STEP_HELP = "LoRA-SB: adam: dW = -eta G/(|G|+eps). sign: -eta sign(G), the official code's."
SB_GRAD_MODE_HELP = "LoRA-SB: eval: gradient pass with dropout off. train: dropout on, as the official code."
SB_ACCUM_HELP = "LoRA-SB: dtype of the gradient sums: float32, or bfloat16 (the official code's on bf16)."
# LoRA-SB's choices (the core's tables in sb.py stay the authority for library callers).
SbStep = Literal["adam", "sign"]
SbGradMode = Literal["eval", "train"]
SbAccumDtype = Literal["float32", "bfloat16"]


@handle_errors
def init(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local directory, Hugging Face model id, or .gguf file."),
    rank: int = typer.Option(
        ..., "--rank", "-r", help="Rank r of the factors (adapters use r x r numbers per module)."
    ),
    targets: str | None = typer.Option(None, "--targets", "-t", help=TARGETS_HELP),
    method: MethodOption = "xs",
    svd: SvdOption = "torch",
    niter: int | None = typer.Option(
        None,
        "--niter",
        callback=EVERY,
        help="Power iterations of the randomized SVD (default: 4; sklearn: 10).",
    ),
    oversample: int | None = typer.Option(
        None,
        "--oversample",
        callback=EVERY,
        help="Extra random directions, q = r + p (default: 16; sklearn: 10).",
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        callback=SEED,
        help="Seed of the SVD's own generator (sklearn: random_state 42 + seed) and the sample.",
    ),
    device: str | None = typer.Option(
        None, "--device", help="Where the SVD runs: cpu, cuda, cuda:1 (default: cpu)."
    ),
    dtype: WeightsDtypeOption = "auto",
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="LoRA-SB: training data whose sample gradient sets the factors."
    ),
    task: Task = typer.Option("causal-lm", "--task", help="LoRA-SB: causal-lm, seq-cls or regression."),
    samples: int = typer.Option(
        64, "--samples", callback=AT_LEAST_ONE, help="LoRA-SB: examples in the gradient sample."
    ),
    sb_lr: float = typer.Option(
        3e-4, "--sb-lr", callback=POSITIVE, help="LoRA-SB: eta of the approximated first AdamW step."
    ),
    sb_step: SbStep = typer.Option("adam", "--sb-step", help=SB_STEP_HELP),
    sb_grad_mode: SbGradMode = typer.Option("eval", "--sb-grad-mode", help=SB_GRAD_MODE_HELP),
    sb_accum_dtype: SbAccumDtype = typer.Option("float32", "--sb-accum-dtype", help=SB_ACCUM_HELP),
    batch_size: int = typer.Option(
        8, "--batch-size", "-b", callback=AT_LEAST_ONE, help="LoRA-SB: batch size of the gradient pass."
    ),
    max_length: int = typer.Option(
        512, "--max-length", callback=AT_LEAST_ONE, help="LoRA-SB: tokens per example."
    ),
    max_grad_memory: str = typer.Option(
        "2GiB", "--max-grad-memory", help="LoRA-SB: gradient accumulators per pass (more: groups)."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute even when the cache has the entry."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (hit or miss, sizes, memory) and exit."
    ),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Compute LoRA-XS factors for MODEL (or serve them from the cache)."""
    out = get_output(ctx, json_flag)
    from ..factors import SVDSettings
    from ..initialize import FactorRequest, ensure_factors, parse_bytes, plan_factors
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
    compute = None
    if method == "sb":
        request, compute = _sb_request(request, data, task, samples, sb_lr, batch_size, max_length, seed,
                                       max_grad_memory, sb_step, sb_grad_mode, sb_accum_dtype)  # fmt: skip
    elif data is not None:
        from ..errors import UsageError

        raise UsageError("--data is for --method sb (LoRA-XS factors come from the weights alone)")
    out.detail(f"resolving {model}")
    plan = plan_factors(request)
    if dry_run:
        _render_plan(out, plan, parse_bytes(max_grad_memory) if method == "sb" else None)
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
    from ..initialize import SBInit, parse_bytes, sb_request

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
    return sb_request(request, sb)


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
        "cache": "hit" if plan.entry else "miss",
        "entry": plan.entry.id if plan.entry else None,
        "factor_bytes": plan.factor_bytes,
        "target_weight_bytes": plan.target_weight_bytes,
        "base_params": base.total_params,
        "base_dtype": str(base.weights_dtype).removeprefix("torch."),
    }
    if grad_budget is not None:
        from ..sb import plan_groups

        doc["sb"] = plan.recipe.extra["sb"]
        accum = doc["sb"].get("accum_dtype", "float32")
        item = 2 if accum == "bfloat16" else 4
        shapes = base.shapes(plan.targets)
        groups = plan_groups(shapes, grad_budget, item)
        doc["gradient_passes"] = len(groups)
        doc["accumulator_bytes"] = max(sum(item * m * n for m, n in (shapes[t] for t in g)) for g in groups)

    def render() -> None:
        hit = f"hit ({plan.entry.id})" if plan.entry else "miss: factors would be computed"
        out.out.print(
            styled(
                "[bold]{}[/] ({}, {} parameters)",
                base.resolved.spec,
                base.model_type,
                f"{base.total_params:,}",
            )
        )
        out.out.print(f"  cache:    {hit}")
        out.out.print(f"  modules:  {len(plan.targets)} at rank {plan.request.rank}")
        out.out.print(f"  factors:  {bytes_human(plan.factor_bytes)} on disk (float32)")
        if grad_budget is None:
            out.out.print(
                f"  memory:   base weights in {doc['base_dtype']} + one weight in float32 at a time"
            )
            return
        out.out.print(
            f"  memory:   a training step + {bytes_human(doc['accumulator_bytes'])} of {accum} gradient "
            f"accumulators ({doc['gradient_passes']} pass(es) over {doc['sb']['samples']} samples)"
        )

    out.result(doc, render)


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

    def render() -> None:
        of = "dW" if entry.meta["method"] == "sb" else "W"
        energy_table(out.out, modules, rank=rank, r_max=entry.r_max, full=out.verbosity > 0, of=of)
        verb = "served from the cache" if hit else f"computed in {entry.meta.get('seconds', 0):.1f} s"
        out.out.print(
            styled("{} factor pairs at rank {} {}: [bold]{}[/]", len(modules), rank, verb, entry.path)
        )

    out.result(doc, render)
