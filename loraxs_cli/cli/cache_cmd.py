"""`loraxs cache ls | rm | verify`: the factor cache, in the manner of `hf cache`."""

from __future__ import annotations

import time

import typer
from rich.text import Text

from .options import JsonOption, QuietOption, VerboseOption
from .output import get_output, handle_errors, styled
from .render import bytes_human, fits_whole, table

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
    from ..methods import method_of

    recorded = method_of(row["method"], {"sb": row["sb"]}).describe(row["sb"])  # the method's recipe fields
    if recorded:
        method += f" ({recorded})"
    return method


def _targets(row: dict) -> str:
    from .render import short_kinds

    return f"{', '.join(short_kinds(row['targets']))} ({row['modules']} modules)"


@app.command("ls")
@handle_errors
def ls(
    ctx: typer.Context,
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """List cached factor sets: id, base, method, rank, dtype, targets, size, last use."""
    out = get_output(ctx)
    from ..cache import FactorCache

    cache = FactorCache()
    rows = [_describe(e) for e in cache.entries()]
    doc = {"root": str(cache.root), "entries": rows, "bytes": sum(r["bytes"] for r in rows)}

    out.result(
        doc,
        lambda doc: _entries_view(doc, fits=lambda view: fits_whole(out.out, view, [r["id"] for r in rows])),
    )


def _entries_view(doc: dict, fits) -> list:
    """The entries as a table, or (too narrow for whole ids) one block per entry, the id on a line of
    its own: the id is what `cache rm` takes, by copy and paste."""
    rows, root = doc["entries"], doc["root"]
    if not rows:
        return [f"factor cache {root}: no entries"]
    columns = [("id", {"no_wrap": True}), ("base", {"justify": "left", "overflow": "fold"}),
               ("method", {"justify": "left", "overflow": "fold"}),
               "r_max", ("dtype", {"justify": "left"}), ("targets", {"justify": "left", "overflow": "fold"}),
               "size", ("last used", {"justify": "left"})]  # fmt: skip
    cells = [
        (r["id"], str(r["base"]), _method(r), str(r["r_max"]), str(r["dtype"]), _targets(r),
         bytes_human(r["bytes"]), r["last_used"])
        for r in rows
    ]  # fmt: skip
    listed = table(f"factor cache {root}", columns, cells, title_justify="left")
    if fits(listed):
        view: list = [listed]
    else:
        view = [f"factor cache {root}"]
        for r in rows:
            view.append(r["id"])
            view.append(
                f"  base {r['base']}; {_method(r)}; r_max {r['r_max']}; {r['dtype']}; "
                f"targets {_targets(r)}; {bytes_human(r['bytes'])}; last used {r['last_used']}"
            )
    return [*view, f"{len(rows)} entries, {bytes_human(doc['bytes'])}"]


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
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Remove cached factor sets (adapters trained on them need `init` again, or embedded factors).

    Answering no to the question removes nothing and exits 0."""
    out = get_output(ctx)
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
    doc = {"removed": [e.id for e in chosen], "bytes": freed}
    out.result(doc, f"removed {len(chosen)} entries, {bytes_human(freed)} freed")


@app.command("verify")
@handle_errors
def verify(
    ctx: typer.Context,
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Re-hash every entry; exits 3 when one is damaged."""
    out = get_output(ctx)
    from ..cache import FactorCache
    from ..errors import EXIT_BAD_INPUT

    cache = FactorCache()
    results = [{"id": e.id, "problem": e.verify()} for e in cache.entries()]
    stale = cache.clean_stale_temps()
    damaged = [r for r in results if r["problem"]]

    doc = {"entries": results, "damaged": len(damaged), "stale_temps_removed": stale}
    out.result(doc, _verify_view)
    if damaged:
        raise typer.Exit(EXIT_BAD_INPUT)


def _verify_view(doc: dict) -> list:
    lines = [
        Text.assemble(
            f"{r['id']}: ",
            styled("[red]DAMAGED[/] {}", r["problem"]) if r["problem"] else styled("[green]ok[/]"),
        )
        for r in doc["entries"]
    ]
    return [*lines, f"{len(doc['entries'])} entries checked, {doc['damaged']} damaged"]
