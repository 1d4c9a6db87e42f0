"""`loraxs eval MODEL [--adapter DIR]... --data EVAL`: measure the base model or adapters on one data set."""

from __future__ import annotations

import typer

from .options import (
    AT_LEAST_ONE,
    SEED,
    ConfigOption,
    DeviceOption,
    EvalTaskOption,
    JsonOption,
    MaxLengthOption,
    MaxNewTokensOption,
    ModelArgument,
    QuantizeOption,
    QuietOption,
    VerboseOption,
    WeightsDtypeOption,
)
from .output import get_output, handle_errors
from .render import table

SHOWN = ("loss", "perplexity", "accuracy", "macro_f1", "mcc", "pearson", "spearman", "mse", "exact_match")


@handle_errors
def evaluate(
    ctx: typer.Context,
    model: ModelArgument,
    data: str = typer.Option(..., "--data", "-d", help="Evaluation data: .jsonl, .csv, .parquet or .txt."),
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="Adapter directory (repeat for several; none: the base model)."
    ),
    task: EvalTaskOption = None,
    batch_size: int = typer.Option(
        16, "--batch-size", "-b", callback=AT_LEAST_ONE, help="Examples per forward pass."
    ),
    max_length: MaxLengthOption = 512,
    generate: bool = typer.Option(
        False, "--generate", help="Greedy generation; score the final answer by exact match."
    ),
    max_new_tokens: MaxNewTokensOption = 64,
    answer_regex: str | None = typer.Option(
        None,
        "--answer-regex",
        help="Regex whose (first group of the) last match is the answer. "
        "Default: the number after '####', else the last number.",
    ),
    limit: int | None = typer.Option(
        None, "--limit", callback=AT_LEAST_ONE, help="Evaluate the first N rows only."
    ),
    device: DeviceOption = None,
    dtype: WeightsDtypeOption = "auto",
    quantize: QuantizeOption = None,
    seed: int = typer.Option(
        0, "--seed", callback=SEED, help="Seed of an untrained head (base-model classification)."
    ),
    config: ConfigOption = None,
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Loss/perplexity, accuracy/F1/MCC, correlations, or generation exact match."""
    out = get_output(ctx)
    from ..evaluate import EvalRequest, run_eval

    request = EvalRequest(
        model=model,
        data=data,
        adapters=list(adapter),
        task=task,
        batch_size=batch_size,
        max_length=max_length,
        generate=generate,
        max_new_tokens=max_new_tokens,
        answer_regex=answer_regex,
        limit=limit,
        device=device,
        dtype=dtype,
        seed=seed,
        quantize=quantize,
    )
    state = {}

    def on_start(total: int) -> None:
        state["advance"] = state["stack"].enter_context(out.progress("eval", total=total))

    from contextlib import ExitStack

    with ExitStack() as stack:
        state["stack"] = stack
        results = run_eval(request, on_start=on_start, on_batch=lambda n: state["advance"](n))
    doc = {"model": model, "data": data, "results": results}
    if quantize:
        doc["quantize"] = quantize
    out.result(doc, _results_view)


def _results_view(doc: dict):
    results = doc["results"]
    columns = [k for k in SHOWN if any(k in r for r in results)]
    under, labels = adapter_labels([row["adapter"] for row in results])
    title = f"{doc['model']} on {doc['data']}" + (f" (adapters under {under})" if under else "")
    if doc.get("quantize"):
        title += f", {doc['quantize']}-quantized"
    rows = [
        (label, str(row["examples"]),
         *(f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in columns))
        for row, label in zip(results, labels, strict=True)
    ]  # fmt: skip
    # The adapter column is never cut: rows that differ only at the end of a long path must not look the same.
    return table(title, [("adapter", {"overflow": "fold"}), "examples", *columns], rows)


def adapter_labels(adapters: list[str | None]) -> tuple[str | None, list[str]]:
    """(common directory, row labels): the part of each adapter path after the directory that all
    of them share (runs/alice/adapter and runs/bob/adapter -> 'runs', ['alice/adapter', ...])."""
    import os

    paths = [a for a in adapters if a]
    under = None
    if len(paths) > 1:
        try:
            under = os.path.commonpath(paths)
        except ValueError:  # absolute and relative paths mixed
            under = None
        if under and any(p == under for p in paths):  # one adapter is the common directory itself
            under = os.path.dirname(under)
    labels = ["(base model)" if not a else os.path.relpath(a, under) if under else a for a in adapters]
    return under or None, labels
