"""`loraxs convert`: export to PEFT LoRA, import PEFT LoRA or official LoRA-XS/LoRA-SB checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from .options import AT_LEAST_ONE, FromOption, ToOption
from .output import Output, get_output, handle_errors, styled
from .render import bytes_human

FORMATS_TO = ("peft-lora",)
FORMATS_FROM = ("peft-lora", "official")


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
    method: Annotated[
        Literal["auto", "xs", "sb"],
        typer.Option(
            "--method", help="--from official: xs, sb, or auto (LoRA-SB when A and B are both orthonormal)."
        ),
    ] = "auto",
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Move adapters between loraxs, PEFT LoRA and the official LoRA-XS/LoRA-SB checkpoints."""
    output = get_output(ctx, json_flag)
    from ..errors import UsageError

    if (to is None) == (from_ is None):
        raise UsageError("give exactly one of --to peft-lora or --from peft-lora|official")
    if to is not None and to not in FORMATS_TO:
        raise UsageError(f"unknown --to {to!r}: use {', '.join(FORMATS_TO)}")
    if from_ is not None and from_ not in FORMATS_FROM:
        raise UsageError(f"unknown --from {from_!r}: use {', '.join(FORMATS_FROM)}")
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

    def render() -> None:
        output.out.print(
            styled("[bold]{}[/]: ", out)
            + f"PEFT LoRA, rank {doc['rank']}, lora_alpha {doc['lora_alpha']:g}, "
            f"{doc['modules']} modules, {doc['params']:,} parameters"
            + (f" + {doc['head_params']:,} in the task head" if doc["head_params"] else "")
            + f", {bytes_human(doc['bytes'])}"
        )

    output.result(doc, render)


def _import_peft(output: Output, src: str, model: str, out: str, rank: int | None, force: bool) -> None:
    from ..convert import import_peft
    from .render import module_kind

    doc = import_peft(src, model, out, rank=rank, force=force)

    def render() -> None:
        from rich.table import Table

        p = output.out.print
        p(
            styled("[bold]{}[/]: ", out) + f"LoRA-XS rank {doc['rank']} from a rank-{doc['lora_rank']} LoRA, "
            f"{doc['modules']} modules, {doc['params']:,} parameters; "
            f"retained {doc['retained_energy']:.1%} of ||dW||_F^2"
        )
        kinds: dict[str, list[float]] = {}
        for name, row in doc["per_module"].items():
            kinds.setdefault(module_kind(name), []).append(row["retained"])
        table = Table(title="retained share of each update, by module kind", title_justify="left")
        for column in ("module", "mean", "min"):
            table.add_column(column, justify="left" if column == "module" else "right")
        for kind, values in kinds.items():
            table.add_row(kind, f"{sum(values) / len(values):.1%}", f"{min(values):.1%}")
        output.out.print(table)

    output.result(doc, render)


def _import_official(output: Output, src: str, model: str, out: str, method: str, force: bool) -> None:
    from ..convert import import_official

    doc = import_official(src, model, out, method=method, force=force)
    if doc["method"] != doc["method_detected"]:
        output.warn(
            f"the factors look like LoRA-{doc['method_detected'].upper()}; "
            f"recorded as LoRA-{doc['method'].upper()} as --method says"
        )

    def render() -> None:
        output.out.print(
            styled("[bold]{}[/]: ", out)
            + f"LoRA-{doc['method'].upper()} rank {doc['rank']}, alpha {doc['alpha']:g}, "
            f"{doc['modules']} modules, {doc['params']:,} parameters, factors embedded"
            + (f", task head {', '.join(doc['head'])}" if doc["head"] else "")
            + (f", {len(doc['labels'])} labels" if doc["labels"] else "")
        )

    output.result(doc, render)
