"""`loraxs merge MODEL --adapter DIR --out MERGED`: fold an adapter into its base, shard by shard."""

from __future__ import annotations

import typer

from .options import (
    ConfigOption,
    ForceReplaceOption,
    JsonOption,
    MergeDtypeOption,
    MergeQuantizeOption,
    QuietOption,
    VerboseOption,
)
from .output import get_output, handle_errors, styled
from .render import Fields, bytes_human


@handle_errors
def merge(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="The adapter's base: local directory or Hugging Face model id."),
    adapter: str = typer.Option(
        ..., "--adapter", "-a", help="loraxs adapter directory, or ORG/NAME or ORG/NAME@REV on the Hub."
    ),
    out: str = typer.Option(..., "--out", "-o", help="Directory for the merged model (must not exist)."),
    dtype: MergeDtypeOption = "auto",
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Before publishing, load the merged model and base + adapter and compare their logits "
        "(needs memory for both models).",
    ),
    quantize: MergeQuantizeOption = None,
    force: ForceReplaceOption = False,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (shards, sizes, memory) and exit."),
    config: ConfigOption = None,
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Write W' = W + s B R A into a copy of the base (same shards, config and tokenizer)."""
    out_ = get_output(ctx)
    from ..adapter import trained_quantized
    from ..merge import QUANTIZED_NOTE, plan_merge, run_merge

    if quantize and not verify:
        from ..errors import UsageError

        raise UsageError("--quantize compares the merge with the quantized base: it needs --verify")
    plan = plan_merge(model, adapter, out, dtype=dtype, force=force)
    doc = plan.as_dict()
    trained = trained_quantized(plan.adapter.config)
    if trained:  # said before the merge: the adapter does not need the quantized base it was trained on
        out_.info(QUANTIZED_NOTE.format(kind=trained))
    if dry_run:
        out_.result({"dry_run": True, **doc}, lambda doc: _plan_view(plan, doc, model, adapter, out))
        return
    with out_.progress("merge", total=len(plan.shards)) as advance:
        report = run_merge(
            plan,
            verify=verify,
            quantize=quantize,
            on_shard=lambda name: advance(1, name),
            on_verify=lambda: out_.info("verifying: loading base + adapter and the merged model"),
        )
    doc.update(report)

    out_.result(doc, lambda doc: _merged_view(doc, out, len(plan.shards)))


def _plan_view(plan, doc: dict, model: str, adapter: str, out: str) -> Fields:
    head = f", head {', '.join(doc['head'])}" if doc["head"] else ""
    shards = f"{bytes_human(plan.checkpoint_bytes)}, largest {bytes_human(plan.largest_shard_bytes)}"
    peak = f"about {bytes_human(plan.estimated_peak_bytes)} (factors {bytes_human(plan.factor_bytes)})"
    return Fields(
        styled("[bold]merge plan[/] {} + {} -> {}", model, adapter, out),
        [
            ("shards", f"{len(plan.shards)} ({shards})"),
            ("modules", f"{len(plan.targets)} merged{head}"),
            ("dtype", doc["dtype"]),
            ("peak memory", peak),
        ],
        width=13,
    )


def _merged_view(report: dict, out: str, shards: int) -> Fields:
    """`report`: the result document (the plan and what run_merge reported)."""
    v = report.get("verify")
    verified = v and (
        f"max |diff| {v['max_abs_diff']:.3g} (relative {v['relative_diff']:.2g}, "
        f"tolerance {v['tolerance']:g}) on {v['samples']} samples"
    )
    heading = styled("[bold]{}[/]", out) + (
        f": merged {report['merged_modules']} modules into {shards} shard(s), "
        f"{bytes_human(report['bytes'])} in {report['seconds']:.1f}s"
    )
    head = ("task head", ", ".join(report["head"])) if report["head"] else None
    q = (v or {}).get("quantized")
    quantized = q and (
        f"max |diff| {q['max_abs_diff']:.3g} (relative {q['relative_diff']:.2g}, "
        f"tolerance {q['tolerance']:g}) against the {q['quantize']}-quantized base + adapter"
    )
    trained = report.get("trained_quantized")
    into = f"full-precision weights (trained on the {trained}-quantized base)" if trained else None
    rows = [head, ("merged into", into) if into else None, ("verified", verified) if v else None]
    return Fields(heading, [*rows, ("quantized", quantized) if q else None], width=0)
