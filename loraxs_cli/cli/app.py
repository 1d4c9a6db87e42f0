"""The root `loraxs` app: global options, command registration, the entry point."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import EXIT_INTERRUPTED
from . import (
    cache_cmd,
    convert_cmd,
    eval_cmd,
    generate_cmd,
    init_cmd,
    inspect_cmd,
    merge_cmd,
    pack_cmd,
    push_cmd,
    train_cmd,
)
from .options import JsonOption, QuietOption, VerboseOption
from .output import get_output, print_error, quiet_library_progress, reserve_standard_streams, usage_line


class LoraxsGroup(TyperGroup):
    """The root command. Usage errors (unknown option, missing argument, bad or unknown choice) are
    one line on stderr and exit 2, like every other error, instead of click's usage panel.

    Runs typer's main with standalone_mode=False, which hands click's exceptions (all of them
    typer.TyperException) to us; this also holds under CliRunner, which calls main() too.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as error:
            if type(error).__name__ == "NoArgsIsHelpError":
                code = error.exit_code  # `loraxs` alone: typer has printed the help already
            else:
                print_error(usage_line(error))
                code = error.exit_code
        except typer.Abort:  # Ctrl-C or end of input at a prompt
            print_error("interrupted", plain=True)
            code = EXIT_INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="loraxs",
    help="LoRA-XS and LoRA-SB adapters: train r x r matrices between frozen SVD factors "
    "(100-1000x smaller than LoRA).",
    no_args_is_help=True,
    cls=LoraxsGroup,
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
    verbose: VerboseOption = 0,
    quiet: QuietOption = False,
    json_flag: JsonOption = False,
) -> None:
    """Global options. Exit codes: 0 ok, 2 usage, 3 bad input, 4 incompatible, 5 diverged, 130 interrupted.

    Set LORAXS_DEBUG=1 for tracebacks, LORAXS_HOME for the factor cache (default ~/.cache/loraxs).
    -q, -v and --json may also follow the command.
    """
    get_output(ctx)  # the invocation's Output; the options' callbacks have set it


app.command("init")(init_cmd.init)
app.command("inspect")(inspect_cmd.inspect)
app.command("train", cls=train_cmd.TrainCommand)(train_cmd.train)
app.command("eval")(eval_cmd.evaluate)
app.command("merge")(merge_cmd.merge)
app.command("convert")(convert_cmd.convert)
app.command("generate")(generate_cmd.generate)
app.command("pack")(pack_cmd.pack)
app.command("unpack")(pack_cmd.unpack)
app.command("push")(push_cmd.push)
app.add_typer(cache_cmd.app, name="cache")


def main() -> None:
    """The `loraxs` program (and `python -m loraxs_cli`): a process of its own."""
    reserve_standard_streams()
    quiet_library_progress(sys.argv[1:])
    app(prog_name="loraxs")
