"""`loraxs generate MODEL --adapters DIR... --prompts FILE.jsonl`: batched generation, one adapter per row."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import typer

from .output import get_output, handle_errors

ADAPTERS_HELP = (
    "Adapter to load (repeat): DIR (named by its directory name), NAME=DIR, PACK.safetensors (all its "
    "members, by member name) or PACK.safetensors::NAME. Prompt rows name them in their 'adapter' field."
)


@contextmanager
def _replaced_on_success(path: str) -> Iterator[TextIO]:
    """Write to a temporary sibling renamed over `path` at the end, so that a failed run (bad input,
    full disk) leaves an earlier output file intact."""
    from ..errors import BadInputError

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        handle = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed below, before the rename)
    except OSError as error:
        raise BadInputError(f"cannot write {path}: {error.strerror}") from None
    try:
        with handle:
            yield handle
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@handle_errors
def generate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Local directory, Hugging Face model id, or .gguf file."),
    prompts: str = typer.Option(
        ..., "--prompts", "-p", help='JSONL rows {"adapter": NAME or null, "prompt": TEXT} (or "messages").'
    ),
    adapters: list[str] = typer.Option([], "--adapters", "--adapter", "-a", help=ADAPTERS_HELP),
    out_file: str | None = typer.Option(None, "--out", "-o", help="Write the JSONL here instead of stdout."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Rows per forward pass (any adapters)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (default): greedy; > 0: sampling."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold (with --temperature)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (same seed, inputs, batch size: same output)."),
    device: str | None = typer.Option(None, "--device"),
    dtype: str = typer.Option("auto", "--dtype", help="Base weights dtype: auto, fp32, bf16, fp16."),
    json_flag: bool = typer.Option(
        False, "--json", help="Summary as JSON (with --out); rows are JSONL anyway."
    ),
) -> None:
    """Generate for every prompt row: one JSON line {row, adapter, prompt, output} per row as batches end."""
    out = get_output(ctx, json_flag)
    import json
    import sys
    from contextlib import ExitStack

    from ..errors import UsageError
    from ..generate import GenerateRequest, run_generate

    if batch_size <= 0 or max_new_tokens <= 0:
        raise UsageError("--batch-size and --max-new-tokens must be positive")
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
    )
    with ExitStack() as stack:
        sink = stack.enter_context(_replaced_on_success(out_file)) if out_file else sys.stdout
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
        out.result(
            {"model": model, "prompts": prompts, "rows": count, "out": out_file},
            lambda: out.info(f"wrote {count} rows to {out_file}"),
        )
