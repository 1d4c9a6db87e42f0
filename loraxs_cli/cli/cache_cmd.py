"""`loraxs cache ls | rm | verify`: the factor cache, in the manner of `hf cache`."""

from __future__ import annotations

import time

import typer

from .output import get_output, handle_errors
from .render import bytes_human

app = typer.Typer(help="List, remove and verify cached factor sets.", no_args_is_help=True)


def _describe(entry) -> dict:
    meta = entry.meta
    extra = meta.get("recipe", {}).get("extra", {})
    return {
        "id": entry.id,
        "path": str(entry.path),
        "base": meta.get("base", {}).get("slug"),
        "base_spec": meta.get("base", {}).get("spec"),
        "fingerprint": meta.get("base", {}).get("fingerprint"),
        "method": meta.get("method"),
        "r_max": entry.r_max,
        "modules": len(entry.modules),
        "svd": meta.get("recipe", {}).get("svd"),
        "sb": extra.get("sb"),
        "bytes": entry.size_bytes(),
        "created": meta.get("created"),
        "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used())),
        "sha256": entry.sha256,
    }


@app.command("ls")
@handle_errors
def ls(
    ctx: typer.Context,
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """List cached factor sets: base, method, rank, size, last use."""
    out = get_output(ctx, json_flag)
    from ..cache import FactorCache

    cache = FactorCache()
    rows = [_describe(e) for e in cache.entries()]
    doc = {"root": str(cache.root), "entries": rows, "bytes": sum(r["bytes"] for r in rows)}

    def render() -> None:
        from rich.table import Table

        table = Table(title=f"factor cache {cache.root}", title_justify="left")
        table.add_column("id", overflow="fold")  # complete: it is what `cache rm` takes
        for column in ("base", "method", "r_max", "modules", "size", "last used"):
            table.add_column(column, justify="right" if column in ("r_max", "modules", "size") else "left")
        for r in rows:
            method = r["method"] + (
                f" ({r['sb']['samples']} samples of {r['sb']['data_sha256'][:8]}, eta {r['sb']['eta']})"
                if r["sb"]
                else ""
            )
            table.add_row(
                r["id"],
                str(r["base"]),
                method,
                str(r["r_max"]),
                str(r["modules"]),
                bytes_human(r["bytes"]),
                r["last_used"],
            )
        out.out.print(table)
        out.out.print(f"{len(rows)} entries, {bytes_human(doc['bytes'])}")

    out.result(doc, render)


@app.command("rm")
@handle_errors
def rm(
    ctx: typer.Context,
    ids: list[str] = typer.Argument(
        ..., help="Entry ids as shown by `loraxs cache ls` (or a base directory name)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Remove cached factor sets (adapters trained on them need `init` again, or embedded factors)."""
    out = get_output(ctx, json_flag)
    from ..cache import FactorCache
    from ..errors import BadInputError

    cache = FactorCache()
    chosen = []
    for entry_id in ids:
        matches = [e for e in cache.entries() if e.id == entry_id or e.path.parent.name == entry_id]
        if not matches:
            raise BadInputError(f"no cache entry {entry_id!r}; see `loraxs cache ls`")
        chosen += matches
    if not yes and not out.json_mode:
        names = ", ".join(e.id for e in chosen)
        if not typer.confirm(f"remove {names}?", err=True):
            raise typer.Exit(1)
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
            state = f"[red]DAMAGED[/] {r['problem']}" if r["problem"] else "[green]ok[/]"
            out.out.print(f"{r['id']}: {state}")
        out.out.print(f"{len(results)} entries checked, {len(damaged)} damaged")

    out.result({"entries": results, "damaged": len(damaged), "stale_temps_removed": stale}, render)
    if damaged:
        raise typer.Exit(EXIT_BAD_INPUT)
