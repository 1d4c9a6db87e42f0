"""`loraxs pack ADAPTER... --out PACK` and `loraxs unpack PACK --out DIR`: many adapters in one file."""

from __future__ import annotations

import typer

from ..errors import UsageError
from .options import JsonOption, QuietOption, VerboseOption
from .output import get_output, handle_errors


@handle_errors
def pack(
    ctx: typer.Context,
    adapters: list[str] = typer.Argument(
        ...,
        help="Adapter directories (named by directory name; RUN/adapter and RUN/best by the run's), "
        "NAME=DIR, or PACK::NAME members.",
    ),
    out_file: str = typer.Option(..., "--out", "-o", help="The pack file to write (.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pack."),
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Put adapters (R matrices, heads, configs) into one safetensors file with an index."""
    out = get_output(ctx)
    from ..pack import pack_adapters
    from ..sources import parse_specs

    if not out_file.endswith(".safetensors"):
        raise UsageError(f"--out {out_file}: a pack file name must end in .safetensors")
    named = [(source.name, source.spec) for source in parse_specs(adapters)]
    summary = pack_adapters(named, out_file, force=force)
    done = f"packed {summary['adapters']} adapters into {summary['pack']} ({summary['bytes']:,} bytes)"
    out.result(summary, done)


@handle_errors
def unpack(
    ctx: typer.Context,
    pack_file: str = typer.Argument(..., help="A pack made by `loraxs pack`."),
    out_dir: str | None = typer.Option(
        None, "--out", "-o", help="Directory to write OUT/NAME adapter directories in (not with --list)."
    ),
    names: list[str] = typer.Option([], "--name", "-n", help="Only this member (repeat); default: all."),
    list_only: bool = typer.Option(False, "--list", help="List the members and exit."),
    force: bool = typer.Option(False, "--force", help="Replace existing adapter directories."),
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Write pack members back as adapter directories (their sha256 is checked first)."""
    out = get_output(ctx)
    from ..pack import pack_names
    from ..pack import unpack as unpack_members

    if list_only:
        members = pack_names(pack_file)
        out.result({"pack": pack_file, "adapters": members}, "\n".join(members))
        return
    if out_dir is None:
        raise UsageError("unpack needs --out DIR (or --list to only list the members)")
    written = unpack_members(pack_file, out_dir, names, force=force)
    out.result({"pack": pack_file, "written": written}, f"unpacked {len(written)} adapters into {out_dir}")
