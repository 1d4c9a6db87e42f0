"""`loraxs convert`: export to PEFT LoRA, import PEFT LoRA or official LoRA-XS/LoRA-SB checkpoints."""

from __future__ import annotations

import typer

from .options import (
    AT_LEAST_ONE,
    ForceReplaceOption,
    FromOption,
    JsonOption,
    OfficialMethodOption,
    QuietOption,
    ToOption,
    VerboseOption,
)
from .output import Output, get_output, handle_errors, styled
from .render import bytes_human, module_kind, table


@handle_errors
def convert(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="The adapter directory to convert."),
    out: str = typer.Option(..., "--out", "-o", help="Directory to write (must not exist without --force)."),
    to: ToOption = None,
    from_: FromOption = None,
    model: str | None = typer.Option(None, "--model", "-m", help="The base model (needed with --from)."),
    rank: int | None = typer.Option(
        None,
        "--rank",
        "-r",
        callback=AT_LEAST_ONE,
        help="--from peft-lora: LoRA-XS rank (default: the LoRA's rank).",
    ),
    pad_rank: int | None = typer.Option(
        None,
        "--pad-rank",
        callback=AT_LEAST_ONE,
        help="--to peft-lora: pad to this rank with zeros (the update B A is unchanged).",
    ),
    method: OfficialMethodOption = "auto",
    force: ForceReplaceOption = False,
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Move adapters between loraxs, PEFT LoRA and the official LoRA-XS/LoRA-SB checkpoints."""
    output = get_output(ctx)
    from ..errors import UsageError

    if (to is None) == (from_ is None):
        raise UsageError("give exactly one of --to peft-lora or --from peft-lora|official")
    if method != "auto" and from_ != "official":
        raise UsageError("--method is for --from official")
    if to is not None:
        if model or rank:
            raise UsageError("--model and --rank are for --from; an export uses the adapter's own")
        _export(output, src, out, pad_rank, force)
        return
    if pad_rank is not None:
        raise UsageError("--pad-rank is for --to peft-lora")
    if model is None:
        raise UsageError(f"--from {from_} needs --model (the base the adapter was trained on)")
    if from_ == "official":
        if rank is not None:
            raise UsageError("--rank is for --from peft-lora; an official checkpoint keeps its own rank")
        _import_official(output, src, model, out, method, force)
    else:
        _import_peft(output, src, model, out, rank, force)


def _export(output: Output, src: str, out: str, pad_rank: int | None, force: bool) -> None:
    from ..convert import export_peft

    doc = export_peft(src, out, pad_rank=pad_rank, force=force)
    if doc["modules_to_save"]:
        output.warn(
            f"the task head ({', '.join(doc['modules_to_save'])}) is under modules_to_save: PEFT loads "
            "this adapter; vLLM refuses adapters with modules_to_save (its newest releases take only "
            "classifier/score, on classification models)"
        )

    output.result(
        doc,
        styled("[bold]{}[/]: ", out) + f"PEFT LoRA, rank {doc['rank']}, lora_alpha {doc['lora_alpha']:g}, "
        f"{doc['modules']} modules, {doc['params']:,} parameters"
        + (f" + {doc['head_params']:,} in the task head" if doc["head_params"] else "")
        + f", {bytes_human(doc['bytes'])}",
    )


def _import_peft(output: Output, src: str, model: str, out: str, rank: int | None, force: bool) -> None:
    from ..convert import import_peft

    doc = import_peft(src, model, out, rank=rank, force=force)
    output.result(doc, lambda doc: _imported_view(doc, out))


def _imported_view(doc: dict, out: str) -> list:
    kinds: dict[str, list[float]] = {}
    for name, row in doc["per_module"].items():
        kinds.setdefault(module_kind(name), []).append(row["retained"])
    rows = [
        (kind, f"{sum(values) / len(values):.1%}", f"{min(values):.1%}") for kind, values in kinds.items()
    ]
    return [
        styled("[bold]{}[/]: ", out) + f"LoRA-XS rank {doc['rank']} from a rank-{doc['lora_rank']} LoRA, "
        f"{doc['modules']} modules, {doc['params']:,} parameters; "
        f"retained {doc['retained_energy']:.1%} of ||dW||_F^2",
        table("retained share of each update, by module kind", ("module", "mean", "min"), rows,
              title_justify="left"),
    ]  # fmt: skip


def _import_official(output: Output, src: str, model: str, out: str, method: str, force: bool) -> None:
    from ..convert import import_official

    doc = import_official(src, model, out, method=method, force=force)
    if doc["method"] != doc["method_detected"]:
        output.warn(
            f"the factors look like LoRA-{doc['method_detected'].upper()}; "
            f"recorded as LoRA-{doc['method'].upper()} as --method says"
        )

    output.result(
        doc,
        styled("[bold]{}[/]: ", out)
        + f"LoRA-{doc['method'].upper()} rank {doc['rank']}, alpha {doc['alpha']:g}, "
        f"{doc['modules']} modules, {doc['params']:,} parameters, factors embedded"
        + (f", task head {', '.join(doc['head'])}" if doc["head"] else "")
        + (f", {len(doc['labels'])} labels" if doc["labels"] else ""),
    )
