"""`loraxs inspect`: sizes of LoRA vs VeRA vs LoRA-XS for a model, or what is inside an adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import (
    EVERY,
    JsonOption,
    QuietOption,
    StorageDtypeOption,
    TargetsOption,
    VerboseOption,
    complete_presets,
)
from .output import Output, get_output, handle_errors, styled
from .render import Fields, bytes_human, table


@handle_errors
def inspect(
    ctx: typer.Context,
    target: str = typer.Argument(
        ...,
        help="An adapter directory, a model (directory, config.json, hub id) or a preset (gpt3-175b, ...).",
        autocompletion=complete_presets,
    ),
    rank: int = typer.Option(16, "--rank", "-r", help="LoRA-XS rank for the estimate."),
    targets: TargetsOption = None,
    users: int = typer.Option(
        1_000_000, "--users", callback=EVERY, help="Number of adapters to store (one per user)."
    ),
    dtype: StorageDtypeOption = "fp16",
    lora_rank: int | None = typer.Option(
        None, "--lora-rank", help="LoRA rank to compare with (default: --rank)."
    ),
    vera_rank: int | None = typer.Option(
        None, "--vera-rank", help="VeRA rank to compare with (default: --rank)."
    ),
    json_flag: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = 0,
) -> None:
    """Parameter counts and storage per adapter and for N users, or an adapter's contents."""
    out = get_output(ctx)
    from ..sources import is_adapter_spec

    if is_adapter_spec(target):  # DIR, PACK::NAME, or a pack of one adapter
        _inspect_adapter(out, target)
        return
    if (Path(target) / "adapter_config.json").is_file():
        _inspect_peft(out, Path(target))
        return
    from ..estimate import bytes_for_users, estimate
    from ..inspection import DTYPE_BYTES, target_shapes

    name, shapes, total = target_shapes(target, targets)
    rows = estimate(
        shapes,
        rank,
        dtype_bytes=DTYPE_BYTES[dtype],
        lora_rank=lora_rank,
        vera_rank=vera_rank,
        total_params=total,
    )
    xs = rows[-1]
    doc = {
        "model": name,
        "modules": len(shapes),
        "dtype": dtype,
        "users": users,
        "methods": [
            {
                "method": e.method,
                "rank": e.rank,
                "params": e.params,
                "bytes": e.bytes,
                "bytes_for_users": bytes_for_users(e, users),
                "times_lora_xs": e.params / xs.params if xs.params else None,
            }
            for e in rows
        ],
    }

    out.result(doc, _estimate_view)


def _estimate_view(doc: dict) -> list:
    methods = doc["methods"]
    rows = [
        (
            row["method"],
            "-" if row["rank"] is None else str(row["rank"]),
            f"{row['params']:,}",
            bytes_human(row["bytes"]),
            bytes_human(row["bytes_for_users"]),
            f"{row['times_lora_xs']:,.0f}x" if row["times_lora_xs"] else "-",
        )
        for row in methods
    ]
    columns = ("method", "rank", "trainable", "per adapter", f"{doc['users']:,} users", "x LoRA-XS")
    title = f"{doc['model']}: {doc['modules']} target modules, {doc['dtype']}"
    view: list = [table(title, columns, rows, title_justify="left")]
    xs, lora = methods[-1], next(m for m in methods if m["method"] == "lora")
    if xs["bytes"]:
        view.append(
            f"One LoRA-XS adapter is {bytes_human(xs['bytes'])} against {bytes_human(lora['bytes'])} "
            f"for LoRA (rank {lora['rank']}): {lora['bytes'] / xs['bytes']:,.0f}x less to store per user."
        )
    return view


def _inspect_adapter(out: Output, spec: str) -> None:
    from ..cache import FactorCache
    from ..sources import load_one, spec_path

    adapter = load_one(spec)
    config = adapter.config
    cache = FactorCache()
    entry = cache.get(config.factors.get("id", ""))
    in_cache = entry is not None and entry.sha256 == config.factors.get("sha256")
    path = spec_path(spec)  # the directory, or the pack a member is in
    files = (
        {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
        if path.is_dir()
        else {path.name: path.stat().st_size}
    )
    doc = {
        "path": str(adapter.path),
        "method": config.method,
        "rank": config.rank,
        "alpha": config.alpha,
        "scaling": config.scaling,
        "task": config.task,
        "labels": config.labels,
        "modules": len(config.modules),
        "params": adapter.num_params,
        "head_params": adapter.head_params,
        "files": files,
        "bytes": sum(files.values()),
        "base": config.base,
        "factors": {
            **config.factors,
            "in_cache": in_cache,
            "embedded": adapter.factors is not None,
        },
        "extra": config.extra,
        "sb": (entry.meta.get("recipe", {}).get("extra", {}) if entry else config.extra).get("sb"),
    }

    out.result(doc, _adapter_view)


def _adapter_view(doc: dict) -> Fields:
    from ..methods import method_of

    factors, extra, sb = doc["factors"], doc["extra"], doc["sb"]
    method = method_of(doc["method"], {"sb": sb})  # the recorded recipe fields name it, else the config
    state = "embedded" if factors["embedded"] else ("in the cache" if factors["in_cache"] else "missing")
    source = extra.get("converted_from")
    kept = source.get("retained_energy") if source else None
    rows = [
        ("task", f"{doc['task'] or '-'}" + (f" ({len(doc['labels'])} labels)" if doc["labels"] else "")),
        ("trainable", _trainable(doc)),
        ("files", _files(doc["files"])),
        ("base", f"{doc['base'].get('spec')} (fingerprint {doc['base'].get('fingerprint')})"),
        (
            "factors",
            styled("{} (" + ("[red]{}[/]" if state == "missing" else "{}") + ")", factors.get("id"), state),
        ),
        (method.title, method.describe(sb, "inspect")) if sb else None,
        *(f"  {key}: {value}" for key, value in (extra.get("metrics") or {}).items()),
        (
            "converted",
            f"from {source['format']} {source.get('path')}"
            + (f" (retained {kept:.1%} of ||dW||_F^2)" if kept is not None else ""),
        )
        if source
        else None,
    ]
    heading = styled("[bold]{}[/]: ", doc["path"]) + (
        f"LoRA-{doc['method'].upper()} adapter, rank {doc['rank']}, alpha {doc['alpha']:g}"
    )
    return Fields(heading, rows, width=12)


def _trainable(doc: dict) -> str:
    return f"{doc['params']:,} in {doc['modules']} modules" + (
        f" + {doc['head_params']:,} in the task head" if doc["head_params"] else ""
    )


def _files(files: dict[str, int]) -> str:
    return ", ".join(f"{name} {bytes_human(size)}" for name, size in files.items())


def _inspect_peft(out: Output, path: Path) -> None:
    """A PEFT LoRA directory (what `convert --to peft-lora` writes): rank, parameters, bytes."""
    from ..convert import describe_peft_dir

    doc = {"path": str(path), **describe_peft_dir(path)}

    heading = styled("[bold]{}[/]: ", path) + (
        f"PEFT {doc['peft_type']} adapter ({doc['task_type']}), "
        f"rank {doc['rank']}, lora_alpha {doc['lora_alpha']}"
    )
    out.result(
        doc, Fields(heading, [("trainable", _trainable(doc)), ("files", _files(doc["files"]))], width=12)
    )
