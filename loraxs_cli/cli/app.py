"""The root `loraxs` app: global options, command registration, the entry point."""

from __future__ import annotations

import typer

from .. import __version__
from . import (
    cache_cmd,
    convert_cmd,
    eval_cmd,
    generate_cmd,
    init_cmd,
    inspect_cmd,
    merge_cmd,
    pack_cmd,
    train_cmd,
)
from .output import Output

app = typer.Typer(
    name="loraxs",
    help="LoRA-XS and LoRA-SB adapters: train r x r matrices between frozen SVD factors "
    "(100-1000x smaller than LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loraxs {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the result."),
    json_mode: bool = typer.Option(
        False, "--json", help="Print one JSON document on stdout; logs and progress go to stderr."
    ),
) -> None:
    """Global options. Exit codes: 0 ok, 2 usage, 3 bad input, 4 incompatible, 5 diverged, 130 interrupted.

    Set LORAXS_DEBUG=1 for tracebacks, LORAXS_HOME for the factor cache (default ~/.cache/loraxs).
    """
    ctx.obj = Output(verbosity=-1 if quiet else verbose, json_mode=json_mode)


app.command("init")(init_cmd.init)
app.command("inspect")(inspect_cmd.inspect)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.evaluate)
app.command("merge")(merge_cmd.merge)
app.command("convert")(convert_cmd.convert)
app.command("generate")(generate_cmd.generate)
app.command("pack")(pack_cmd.pack)
app.command("unpack")(pack_cmd.unpack)
app.add_typer(cache_cmd.app, name="cache")


def main() -> None:
    app(prog_name="loraxs")
