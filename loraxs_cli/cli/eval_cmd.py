"""`loraxs eval MODEL [--adapter DIR]... --data EVAL`: measure the base model or adapters on one data set."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import (
    AT_LEAST_ONE,
    DATA_SOURCES_HELP,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    ColumnsOption,
    ConfigOption,
    DataConfigOption,
    DataRevisionOption,
    DataSplitOption,
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

SHOWN = ("loss", "perplexity", "accuracy", "macro_f1", "mcc", "pearson", "spearman", "mse", "exact_match",
         "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")  # fmt: skip


@handle_errors
def evaluate(
    ctx: typer.Context,
    model: ModelArgument,
    data: str | None = typer.Option(
        None, "--data", "-d", help="Evaluation data (or --lm-eval): " + DATA_SOURCES_HELP
    ),
    data_config: DataConfigOption = None,
    data_split: DataSplitOption = None,
    data_revision: DataRevisionOption = None,
    columns: ColumnsOption = None,
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="Adapter directory (repeat for several; none: the base model)."
    ),
    task: EvalTaskOption = None,
    batch_size: int = typer.Option(
        16, "--batch-size", "-b", callback=AT_LEAST_ONE, help="Examples per forward pass."
    ),
    max_length: MaxLengthOption = 512,
    beta: float | None = typer.Option(
        None,
        "--beta",
        callback=POSITIVE,
        help="preference: DPO's beta of the rewards (default: the adapter's, else 0.1).",
    ),
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
        None,
        "--limit",
        callback=AT_LEAST_ONE,
        help="Evaluate the first N rows only (with --lm-eval: the first N documents of each task).",
    ),
    lm_eval: str | None = typer.Option(
        None,
        "--lm-eval",
        help="Run lm-evaluation-harness tasks instead of --data: comma-separated task, group or tag "
        "names, globs (mmlu_*) or YAML files.",
    ),
    lm_eval_include: list[Path] = typer.Option(
        [], "--lm-eval-include", help="A directory of lm-eval YAML tasks to add (repeat for several)."
    ),
    num_fewshot: int | None = typer.Option(
        None, "--num-fewshot", callback=NON_NEGATIVE, help="lm-eval few-shot examples (default: each task's)."
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
    if lm_eval is not None or data is None:
        _refuse_mixed(lm_eval, {"--data": data, "--data-config": data_config, "--data-split": data_split,
                                "--data-revision": data_revision, "--columns": columns, "--task": task,
                                "--generate": generate or None, "--answer-regex": answer_regex})  # fmt: skip
        return _lm_eval(out, model, lm_eval, adapter, lm_eval_include, num_fewshot, limit, batch_size,
                        device, dtype, quantize)  # fmt: skip
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
        beta=beta,
        data_config=data_config,
        data_split=data_split,
        data_revision=data_revision,
        columns=columns,
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


def _refuse_mixed(lm_eval, given: dict) -> None:
    """--lm-eval brings its own data and scoring: with it, the options of --data (`given`, flag -> value
    or None) are usage errors; without it, --data is needed."""
    from ..errors import UsageError

    if lm_eval is None:
        raise UsageError("eval needs --data EVAL (a data file) or --lm-eval TASKS (lm-evaluation-harness)")
    clash = [flag for flag, value in given.items() if value is not None]
    if clash:
        raise UsageError(
            f"--lm-eval runs lm-eval's own tasks and scores: drop {', '.join(clash)} (or run eval twice)"
        )


def _lm_eval(out, model, tasks, adapters, include, num_fewshot, limit, batch_size, device, dtype, quantize):
    from contextlib import ExitStack

    from ..lm_eval_bridge import HarnessRequest, parse_task_list, run_harness

    request = HarnessRequest(
        model=model,
        tasks=parse_task_list(tasks),
        adapters=list(adapters),
        include=[str(p) for p in include],
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        quantize=quantize,
    )
    state = {}
    with ExitStack() as stack:

        def on_start(total: int) -> None:
            state["advance"] = stack.enter_context(out.progress("lm-eval", total=total))

        rows, info = run_harness(request, on_start=on_start, on_run=lambda n: state["advance"](n))
    doc = {
        "model": model,
        "lm_eval": {**info, "requested": request.tasks, "num_fewshot": num_fewshot, "limit": limit},
        "results": rows,
    }
    if quantize:
        doc["quantize"] = quantize
    out.result(doc, _lm_eval_view)


def _lm_eval_view(doc: dict):
    """One line per adapter and task: examples, shots, each metric with its standard error."""
    results = doc["results"]
    metrics = list(dict.fromkeys(
        k for row in results for k in row
        if k not in ("adapter", "task", "examples", "num_fewshot") and "_stderr" not in k
    ))  # fmt: skip
    under, labels = adapter_labels([row["adapter"] for row in results])
    title = f"{doc['model']}: lm-eval {doc['lm_eval'].get('version') or ''}".rstrip()
    title += f" (adapters under {under})" if under else ""

    def cell(row: dict, metric: str) -> str:
        value, error = row.get(metric), row.get(metric.replace(",", "_stderr,", 1) if "," in metric
                                                else f"{metric}_stderr")  # fmt: skip
        if not isinstance(value, int | float):
            return "" if value is None else str(value)
        return f"{value:.4f}" + (f" ± {error:.4f}" if isinstance(error, int | float) else "")

    rows = [
        (label, row["task"], str(row.get("examples", "")), str(row.get("num_fewshot", "")),
         *(cell(row, m) for m in metrics))
        for row, label in zip(results, labels, strict=True)
    ]  # fmt: skip
    return table(title, [("adapter", {"overflow": "fold"}), "task", "examples", "shots", *metrics], rows)


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
