"""`loraxs init MODEL --rank R`: compute the frozen factors once into the shared cache."""

from __future__ import annotations

import typer

from .output import Output, get_output, handle_errors
from .render import bytes_human, energy_table

TARGETS_HELP = (
    "Comma-separated module names, dotted suffixes or globs, or 'all-linear'. Default: per architecture."
)


@handle_errors
def init(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local directory, Hugging Face model id, or .gguf file."),
    rank: int = typer.Option(
        ..., "--rank", "-r", help="Rank r of the factors (adapters use r x r numbers per module)."
    ),
    targets: str | None = typer.Option(None, "--targets", "-t", help=TARGETS_HELP),
    method: str = typer.Option("xs", "--method", help="xs: SVD of the weights (LoRA-XS). sb: LoRA-SB."),
    svd: str = typer.Option(
        "torch", "--svd", help="torch: randomized SVD on --device. sklearn: the paper's TruncatedSVD."
    ),
    niter: int = typer.Option(4, "--niter", help="Power iterations of the randomized SVD."),
    oversample: int = typer.Option(16, "--oversample", help="Extra random directions (q = r + p)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the SVD's own random generator."),
    device: str | None = typer.Option(
        None, "--device", help="Where the SVD runs: cpu, cuda, cuda:1 (default: cpu)."
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="Read the weights in this dtype: auto (checkpoint's), fp32, bf16, fp16."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    force: bool = typer.Option(False, "--force", help="Recompute even when the cache has the entry."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (hit or miss, sizes, memory) and exit."
    ),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Compute LoRA-XS factors for MODEL (or serve them from the cache)."""
    out = get_output(ctx, json_flag)
    from ..factors import SVDSettings
    from ..initialize import FactorRequest, ensure_factors, plan_factors
    from ..models import parse_targets

    request = FactorRequest(
        model=model,
        rank=rank,
        targets=parse_targets(targets),
        method=method,
        svd=SVDSettings(svd, niter, oversample, seed),
        dtype=dtype,
        device=device,
        revision=revision,
    )
    if method == "sb":
        from ..errors import UsageError

        raise UsageError(
            "--method sb needs training data: use `loraxs init --method sb --data ...` (LoRA-SB)"
        )
    out.detail(f"resolving {model}")
    plan = plan_factors(request)
    if dry_run:
        _render_plan(out, plan)
        return
    with out.progress("SVD", total=len(plan.targets)) as advance:
        entry, hit = ensure_factors(
            plan,
            force=force,
            on_start=lambda n: out.info(f"cache miss: computing {n} factor pairs at rank {rank}"),
            on_module=lambda name: advance(status=name),
        )
    _render_entry(out, plan, entry, hit)


def _render_plan(out: Output, plan) -> None:
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

    def render() -> None:
        hit = f"hit ({plan.entry.id})" if plan.entry else "miss: factors would be computed"
        out.out.print(f"[bold]{base.resolved.spec}[/] ({base.model_type}, {base.total_params:,} parameters)")
        out.out.print(f"  cache:    {hit}")
        out.out.print(f"  modules:  {len(plan.targets)} at rank {plan.request.rank}")
        out.out.print(f"  factors:  {bytes_human(plan.factor_bytes)} on disk (float32)")
        out.out.print(f"  memory:   base weights in {doc['base_dtype']} + one weight in float32 at a time")

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
    }

    def render() -> None:
        energy_table(out.out, modules, rank=rank, r_max=entry.r_max, full=out.verbosity > 0)
        verb = "served from the cache" if hit else f"computed in {entry.meta.get('seconds', 0):.1f} s"
        out.out.print(f"{len(modules)} factor pairs at rank {rank} {verb}: [bold]{entry.path}[/]")

    out.result(doc, render)
