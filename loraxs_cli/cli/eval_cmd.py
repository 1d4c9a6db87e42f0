"""`loraxs eval MODEL [--adapter DIR]... --data EVAL`: measure the base model or adapters on one data set."""

from __future__ import annotations

import typer

from .options import AT_LEAST_ONE, SEED, EvalTaskOption, WeightsDtypeOption, config_option
from .output import Output, get_output, handle_errors

SHOWN = ("loss", "perplexity", "accuracy", "macro_f1", "mcc", "pearson", "spearman", "mse", "exact_match")


@handle_errors
def evaluate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local directory, Hugging Face model id, or .gguf file."),
    data: str = typer.Option(..., "--data", "-d", help="Evaluation data: .jsonl, .csv, .parquet or .txt."),
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="Adapter directory (repeat for several; none: the base model)."
    ),
    task: EvalTaskOption = None,
    batch_size: int = typer.Option(16, "--batch-size", "-b", callback=AT_LEAST_ONE),
    max_length: int = typer.Option(
        512, "--max-length", callback=AT_LEAST_ONE, help="Tokens per example (longer text is cut)."
    ),
    generate: bool = typer.Option(
        False, "--generate", help="Greedy generation; score the final answer by exact match."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", callback=AT_LEAST_ONE),
    answer_regex: str | None = typer.Option(
        None,
        "--answer-regex",
        help="Regex whose (first group of the) last match is the answer. "
        "Default: the number after '####', else the last number.",
    ),
    limit: int | None = typer.Option(
        None, "--limit", callback=AT_LEAST_ONE, help="Evaluate the first N rows only."
    ),
    device: str | None = typer.Option(None, "--device"),
    dtype: WeightsDtypeOption = "auto",
    seed: int = typer.Option(
        0, "--seed", callback=SEED, help="Seed of an untrained head (base-model classification)."
    ),
    config: str | None = config_option(),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Loss/perplexity, accuracy/F1/MCC, correlations, or generation exact match."""
    out = get_output(ctx, json_flag)
    import re

    from ..errors import UsageError
    from ..evaluate import EvalRequest, run_eval

    if batch_size <= 0 or max_length <= 0 or max_new_tokens <= 0 or (limit is not None and limit <= 0):
        raise UsageError("--batch-size, --max-length, --max-new-tokens and --limit must be positive")
    if answer_regex:
        try:
            re.compile(answer_regex)
        except re.error as error:
            raise UsageError(f"--answer-regex is not a valid regex: {error}") from None
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
    )
    state = {}

    def on_start(total: int) -> None:
        state["advance"] = state["stack"].enter_context(out.progress("eval", total=total))

    from contextlib import ExitStack

    with ExitStack() as stack:
        state["stack"] = stack
        results = run_eval(request, on_start=on_start, on_batch=lambda n: state["advance"](n))
    _render(out, model, data, results)


def _render(out: Output, model: str, data: str, results: list[dict]) -> None:
    from rich.table import Table

    def render() -> None:
        columns = [k for k in SHOWN if any(k in r for r in results)]
        under, labels = adapter_labels([row["adapter"] for row in results])
        title = f"{model} on {data}" + (f" (adapters under {under})" if under else "")
        table = Table(title=title)
        # Never cut: rows that differ only at the end of a long path must not look the same.
        table.add_column("adapter", overflow="fold")
        table.add_column("examples", justify="right")
        for name in columns:
            table.add_column(name, justify="right")
        for row, label in zip(results, labels, strict=True):
            cells = [
                f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in columns
            ]
            table.add_row(label, str(row["examples"]), *cells)
        out.out.print(table)

    out.result({"model": model, "data": data, "results": results}, render)


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
