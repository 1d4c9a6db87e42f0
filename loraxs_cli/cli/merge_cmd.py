"""`loraxs merge MODEL --adapter DIR --out MERGED`: fold an adapter into its base, shard by shard."""

from __future__ import annotations

import typer

from .options import MergeDtypeOption, config_option
from .output import get_output, handle_errors, styled
from .render import bytes_human


@handle_errors
def merge(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="The adapter's base: local directory or Hugging Face model id."),
    adapter: str = typer.Option(..., "--adapter", "-a", help="loraxs adapter directory."),
    out: str = typer.Option(..., "--out", "-o", help="Directory for the merged model (must not exist)."),
    dtype: MergeDtypeOption = "auto",
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Before publishing, load the merged model and base + adapter and compare their logits "
        "(needs memory for both models).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (shards, sizes, memory) and exit."),
    config: str | None = config_option(),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Write W' = W + s B R A into a copy of the base (same shards, config and tokenizer)."""
    out_ = get_output(ctx, json_flag)
    from ..merge import plan_merge, run_merge

    plan = plan_merge(model, adapter, out, dtype=dtype, force=force)
    doc = plan.as_dict()
    if dry_run:

        def render_plan() -> None:
            p = out_.out.print
            p(styled("[bold]merge plan[/] {} + {} -> {}", model, adapter, out))
            p(
                f"  shards:      {len(plan.shards)} ({bytes_human(plan.checkpoint_bytes)}, "
                f"largest {bytes_human(plan.largest_shard_bytes)})"
            )
            p(
                f"  modules:     {len(plan.targets)} merged"
                + (f", head {', '.join(doc['head'])}" if doc["head"] else "")
            )
            p(f"  dtype:       {doc['dtype']}")
            p(
                f"  peak memory: about {bytes_human(plan.estimated_peak_bytes)} "
                f"(factors {bytes_human(plan.factor_bytes)})"
            )

        out_.result({"dry_run": True, **doc}, render_plan)
        return
    with out_.progress("merge", total=len(plan.shards)) as advance:
        report = run_merge(
            plan,
            verify=verify,
            on_shard=lambda name: advance(1, name),
            on_verify=lambda: out_.info("verifying: loading base + adapter and the merged model"),
        )
    doc.update(report)

    def render() -> None:
        p = out_.out.print
        p(
            styled("[bold]{}[/]", out),
            f": merged {report['merged_modules']} modules into {len(plan.shards)} shard(s), "
            f"{bytes_human(report['bytes'])} in {report['seconds']:.1f}s",
            sep="",
        )
        if report["head"]:
            p(f"  task head: {', '.join(report['head'])}")
        if "verify" in report:
            v = report["verify"]
            p(
                f"  verified: max |diff| {v['max_abs_diff']:.3g} (relative {v['relative_diff']:.2g}, "
                f"tolerance {v['tolerance']:g}) on {v['samples']} samples"
            )

    out_.result(doc, render)
