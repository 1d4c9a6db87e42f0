"""`loraxs cache ls | rm | verify`: the factor cache, in the manner of `hf cache`."""

from __future__ import annotations

import time

import typer

from .output import get_output, handle_errors, styled
from .render import bytes_human, fits_whole

app = typer.Typer(help="List, remove and verify cached factor sets.", no_args_is_help=True)


_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _complete_entries(incomplete: str) -> list[str]:
    """Shell completion of `cache rm`: entry ids, base directories and base names, from the cache's
    directory names alone (fast, no torch)."""
    from ..paths import factors_root

    found: dict[str, None] = {}
    try:
        bases = sorted(p for p in factors_root().iterdir() if p.is_dir() and not p.name.startswith("."))
        for base in bases:
            found[base.name.rpartition("--")[0] or base.name] = None
            found[base.name] = None
            for entry in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found[f"{base.name}/{entry.name}"] = None
    except OSError:
        return []
    return [name for name in found if name.startswith(incomplete)]


def _describe(entry) -> dict:
    from .render import module_kind

    meta = entry.meta
    recipe = meta.get("recipe", {})
    extra = recipe.get("extra", {})
    dtype = recipe.get("weights_dtype")
    return {
        "id": entry.id,
        "path": str(entry.path),
        "base": meta.get("base", {}).get("slug"),
        "base_spec": meta.get("base", {}).get("spec"),
        "fingerprint": meta.get("base", {}).get("fingerprint"),
        "method": meta.get("method"),
        "r_max": entry.r_max,
        "dtype": _SHORT_DTYPES.get(dtype, dtype),
        "targets": list(dict.fromkeys(module_kind(m) for m in entry.modules)),
        "modules": len(entry.modules),
        "svd": recipe.get("svd"),
        "sb": extra.get("sb"),
        "bytes": entry.size_bytes(),
        "created": meta.get("created"),
        "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used())),
        "sha256": entry.sha256,
    }


def _method(row: dict) -> str:
    svd = row["svd"] or {}
    method = str(row["method"])
    if svd.get("backend") not in (None, "torch"):
        method += f" ({svd['backend']} SVD)"
    if row["sb"]:
        sb = row["sb"]
        method += f" ({sb['samples']} samples of {sb['data_sha256'][:8]}, eta {sb['eta']})"
    return method


def _targets(row: dict) -> str:
    from .render import short_kinds

    return f"{', '.join(short_kinds(row['targets']))} ({row['modules']} modules)"


@app.command("ls")
@handle_errors
def ls(
    ctx: typer.Context,
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """List cached factor sets: id, base, method, rank, dtype, targets, size, last use."""
    out = get_output(ctx, json_flag)
    from ..cache import FactorCache

    cache = FactorCache()
    rows = [_describe(e) for e in cache.entries()]
    doc = {"root": str(cache.root), "entries": rows, "bytes": sum(r["bytes"] for r in rows)}

    def render() -> None:
        from rich.table import Table

        table = Table(title=f"factor cache {cache.root}", title_justify="left")
        table.add_column("id", no_wrap=True)  # whole, on one line: it is what `cache rm` takes
        table.add_column("base", overflow="fold")
        table.add_column("method", overflow="fold")
        table.add_column("r_max", justify="right")
        table.add_column("dtype")
        table.add_column("targets", overflow="fold")
        table.add_column("size", justify="right")
        table.add_column("last used")
        for r in rows:
            table.add_row(
                r["id"],
                str(r["base"]),
                _method(r),
                str(r["r_max"]),
                str(r["dtype"]),
                _targets(r),
                bytes_human(r["bytes"]),
                r["last_used"],
            )
        if not rows:
            out.out.print(f"factor cache {cache.root}: no entries")
            return
        if fits_whole(out.out, table, [r["id"] for r in rows]):
            out.out.print(table)
        else:  # too narrow for whole ids in a table: one block per entry, the id on a line of its own
            out.out.print(f"factor cache {cache.root}")
            for r in rows:
                out.out.print(r["id"])
                out.out.print(
                    f"  base {r['base']}; {_method(r)}; r_max {r['r_max']}; {r['dtype']}; "
                    f"targets {_targets(r)}; {bytes_human(r['bytes'])}; last used {r['last_used']}"
                )
        out.out.print(f"{len(rows)} entries, {bytes_human(doc['bytes'])}")

    out.result(doc, render)


@app.command("rm")
@handle_errors
def rm(
    ctx: typer.Context,
    ids: list[str] = typer.Argument(
        ...,
        help="Entry ids as `loraxs cache ls` shows them, or a base (its name in the base column, "
        "or its directory name) for all of its entries.",
        autocompletion=_complete_entries,
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Remove cached factor sets (adapters trained on them need `init` again, or embedded factors).

    Answering no to the question removes nothing and exits 0."""
    out = get_output(ctx, json_flag)
    from ..cache import FactorCache
    from ..errors import BadInputError

    cache = FactorCache()
    entries = list(cache.entries())
    chosen = []
    for wanted in ids:
        key = wanted.strip().rstrip("/")
        matches = [
            e
            for e in entries
            if key in (e.id, e.path.parent.name, e.meta.get("base", {}).get("slug")) and e not in chosen
        ]
        if not matches and not any(key in (e.id, e.path.parent.name) for e in chosen):
            raise BadInputError(f"no cache entry or base {wanted!r}; see `loraxs cache ls`")
        chosen += matches
    if not yes and not out.json_mode:
        names = ", ".join(e.id for e in chosen)
        try:
            confirmed = typer.confirm(f"remove {names}?", err=True)
        except typer.Abort as error:  # click's answer to Ctrl-C and to the end of the input
            if isinstance(error.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            confirmed = False  # no answer is no
        if not confirmed:
            out.info("cancelled: nothing removed")
            return
    freed = 0
    for entry in chosen:
        freed += entry.size_bytes()
        cache.remove(entry)
    out.result(
        {"removed": [e.id for e in chosen], "bytes": freed},
        lambda: out.out.print(f"removed {len(chosen)} entries, {bytes_human(freed)} freed"),
    )


@app.command("verify")
@handle_errors
def verify(
    ctx: typer.Context,
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Re-hash every entry; exits 3 when one is damaged."""
    out = get_output(ctx, json_flag)
    from ..cache import FactorCache
    from ..errors import EXIT_BAD_INPUT

    cache = FactorCache()
    results = [{"id": e.id, "problem": e.verify()} for e in cache.entries()]
    stale = cache.clean_stale_temps()
    damaged = [r for r in results if r["problem"]]

    def render() -> None:
        for r in results:
            state = styled("[red]DAMAGED[/] {}", r["problem"]) if r["problem"] else styled("[green]ok[/]")
            out.out.print(f"{r['id']}: ", state, sep="")
        out.out.print(f"{len(results)} entries checked, {len(damaged)} damaged")

    out.result({"entries": results, "damaged": len(damaged), "stale_temps_removed": stale}, render)
    if damaged:
        raise typer.Exit(EXIT_BAD_INPUT)
