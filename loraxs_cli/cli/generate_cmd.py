"""`loraxs generate MODEL --adapters DIR... --prompts FILE.jsonl`: batched generation, one adapter per row."""

from __future__ import annotations

import typer

from .options import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    SEED,
    TOP_P,
    ColumnsOption,
    DataConfigOption,
    DataRevisionOption,
    DataSplitOption,
    DeviceOption,
    JsonOption,
    MaxNewTokensOption,
    ModelArgument,
    QuantizeOption,
    QuietOption,
    VerboseOption,
    WeightsDtypeOption,
)
from .output import get_output, handle_errors, stdout_stream

ADAPTERS_HELP = (
    "Adapter to load (repeat): DIR (named by its directory name; RUN/adapter by the run's), NAME=DIR, "
    "PACK.safetensors (all its members, by member name), PACK.safetensors::NAME or a Hugging Face adapter "
    "repo ORG/NAME or ORG/NAME@REV. Prompt rows name them in their 'adapter' field."
)


@handle_errors
def generate(
    ctx: typer.Context,
    model: ModelArgument,
    prompts: str = typer.Option(
        ...,
        "--prompts",
        "-p",
        help='Rows {"adapter": NAME or null, "prompt": TEXT} (or "messages"): a JSONL file, or any --data '
        "source of train (a `datasets` directory, a hub dataset id).",
    ),
    data_config: DataConfigOption = None,
    data_split: DataSplitOption = None,
    data_revision: DataRevisionOption = None,
    columns: ColumnsOption = None,
    adapters: list[str] = typer.Option([], "--adapters", "--adapter", "-a", help=ADAPTERS_HELP),
    out_file: str | None = typer.Option(None, "--out", "-o", help="Write the JSONL here instead of stdout."),
    max_new_tokens: MaxNewTokensOption = 64,
    batch_size: int = typer.Option(
        16, "--batch-size", "-b", callback=AT_LEAST_ONE, help="Rows per forward pass (any adapters)."
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", callback=NON_NEGATIVE, help="0 (default): greedy; > 0: sampling."
    ),
    top_p: float = typer.Option(
        1.0, "--top-p", callback=TOP_P, help="Nucleus sampling threshold (with --temperature)."
    ),
    seed: int = typer.Option(
        0, "--seed", callback=SEED, help="Sampling seed (same seed, inputs, batch size: same output)."
    ),
    device: DeviceOption = None,
    dtype: WeightsDtypeOption = "auto",
    quantize: QuantizeOption = None,
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Generate for every prompt row: one JSON line {row, adapter, prompt, output} per row as batches end.

    With --out, --json prints a summary document (the rows are JSONL either way)."""
    out = get_output(ctx)
    import json
    from contextlib import ExitStack

    from ..fsutil import atomic_file, check_output
    from ..generate import GenerateRequest, generate_inputs, run_generate

    request = GenerateRequest(
        model=model,
        prompts=prompts,
        adapters=list(adapters),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        device=device,
        dtype=dtype,
        quantize=quantize,
        data_config=data_config,
        data_split=data_split,
        data_revision=data_revision,
        columns=columns,
    )
    if out_file:  # an earlier output is replaced (only once complete), an input never
        check_output(out_file, generate_inputs(request), force=True)
    with ExitStack() as stack:
        sink = stack.enter_context(atomic_file(out_file)) if out_file else stdout_stream()
        state = {}

        def on_start(total: int) -> None:
            if out_file:
                state["advance"] = stack.enter_context(out.progress("generate", total=total))

        def emit(row: dict) -> None:
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            if "advance" in state:
                state["advance"](1)

        count = run_generate(request, emit, on_start=on_start)
    if out_file:
        doc = {"model": model, "prompts": prompts, "rows": count, "out": out_file}
        out.result(doc, f"wrote {count} rows to {out_file}", note=True)
