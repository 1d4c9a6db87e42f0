"""`loraxs inspect`: sizes of LoRA vs VeRA vs LoRA-XS for a model, or what is inside an adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import EVERY, StorageDtypeOption, complete_presets
from .output import Output, get_output, handle_errors, styled
from .render import bytes_human

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}


@handle_errors
def inspect(
    ctx: typer.Context,
    target: str = typer.Argument(
        ...,
        help="An adapter directory, a model (directory, config.json, hub id) or a preset (gpt3-175b, ...).",
        autocompletion=complete_presets,
    ),
    rank: int = typer.Option(16, "--rank", "-r", help="LoRA-XS rank for the estimate."),
    targets: str | None = typer.Option(
        None, "--targets", "-t", help="Target modules (default: per architecture)."
    ),
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
    json_flag: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Parameter counts and storage per adapter and for N users, or an adapter's contents."""
    out = get_output(ctx, json_flag)
    from ..adapter import is_adapter_dir

    if is_adapter_dir(target):
        _inspect_adapter(out, Path(target))
        return
    if (Path(target) / "adapter_config.json").is_file():
        _inspect_peft(out, Path(target))
        return
    from ..errors import BadInputError

    if dtype not in DTYPE_BYTES:
        raise BadInputError(f"unknown --dtype {dtype!r}: use {', '.join(DTYPE_BYTES)}")
    if users < 0:
        raise BadInputError("--users must be >= 0")
    from ..estimate import bytes_for_users, estimate

    name, shapes, total = _shapes_for(target, targets)
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

    def render() -> None:
        from rich.table import Table

        table = Table(title=f"{name}: {len(shapes)} target modules, {dtype}", title_justify="left")
        for column in ("method", "rank", "trainable", "per adapter", f"{users:,} users", "x LoRA-XS"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in doc["methods"]:
            table.add_row(
                row["method"],
                "-" if row["rank"] is None else str(row["rank"]),
                f"{row['params']:,}",
                bytes_human(row["bytes"]),
                bytes_human(row["bytes_for_users"]),
                f"{row['times_lora_xs']:,.0f}x" if row["times_lora_xs"] else "-",
            )
        out.out.print(table)
        lora = next(e for e in rows if e.method == "lora")
        if xs.bytes:
            out.out.print(
                f"One LoRA-XS adapter is {bytes_human(xs.bytes)} against {bytes_human(lora.bytes)} for LoRA "
                f"(rank {lora.rank}): {lora.bytes / xs.bytes:,.0f}x less to store per user."
            )

    out.result(doc, render)


def _shapes_for(target: str, targets: str | None):
    """(display name, target shapes, total params) from a local model/config, a preset or a hub id."""
    from ..estimate import ModuleShape, find_preset
    from ..models import parse_targets

    wanted = parse_targets(targets)
    path = Path(target).expanduser()
    preset = None if path.exists() else find_preset(target)
    if preset is not None:
        return preset.name, preset.shapes(wanted), preset.total_params
    from ..errors import BadInputError
    from ..estimate import unknown_preset_message
    from ..models import linear_modules, load_config, match_targets, resolve_config_only, skeleton

    try:
        resolved = resolve_config_only(target)
    except BadInputError:
        if path.exists() or "/" in target:
            raise
        # A bare name that is no preset: most likely a mistyped preset, not a hub id.
        raise BadInputError(unknown_preset_message(target)) from None
    config = load_config(resolved)
    meta_model = skeleton(config)
    modules = linear_modules(meta_model)
    names = match_targets(modules, wanted, config.model_type)
    shapes = [ModuleShape(n, modules[n].out_features, modules[n].in_features) for n in names]
    total = sum(p.numel() for p in meta_model.parameters())
    return resolved.spec, shapes, total


def _inspect_adapter(out: Output, path: Path) -> None:
    from ..adapter import EMBEDDED_FACTORS_FILE, load_adapter
    from ..cache import FactorCache

    adapter = load_adapter(path)
    config = adapter.config
    cache = FactorCache()
    entry = cache.get(config.factors.get("id", ""))
    in_cache = entry is not None and entry.sha256 == config.factors.get("sha256")
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    doc = {
        "path": str(path),
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
            "embedded": (path / EMBEDDED_FACTORS_FILE).is_file(),
        },
        "extra": config.extra,
        "sb": (entry.meta.get("recipe", {}).get("extra", {}) if entry else config.extra).get("sb"),
    }

    def render() -> None:
        p = out.out.print
        p(
            styled("[bold]{}[/]: ", path) + f"LoRA-{config.method.upper()} adapter, "
            f"rank {config.rank}, alpha {config.alpha:g}"
        )
        p(
            f"  task:       {config.task or '-'}"
            + (f" ({len(config.labels)} labels)" if config.labels else "")
        )
        p(
            f"  trainable:  {adapter.num_params:,} in {len(config.modules)} modules"
            + (f" + {adapter.head_params:,} in the task head" if adapter.head_params else "")
        )
        p("  files:      " + ", ".join(f"{n} {bytes_human(s)}" for n, s in files.items()))
        p(f"  base:       {config.base.get('spec')} (fingerprint {config.base.get('fingerprint')})")
        state = "embedded" if doc["factors"]["embedded"] else ("in the cache" if in_cache else "missing")
        p(styled("  factors:    {} (" + ("[red]{}[/]" if state == "missing" else "{}") + ")",
                 config.factors.get("id"), state))  # fmt: skip
        if doc["sb"]:
            sb = doc["sb"]
            p(f"  LoRA-SB:    {sb['samples']} samples of data {sb['data_sha256'][:12]}, eta {sb['eta']:g}")
        for key, value in (config.extra.get("metrics") or {}).items():
            p(f"  {key}: {value}")
        source = config.extra.get("converted_from")
        if source:
            kept = source.get("retained_energy")
            p(f"  converted:  from {source['format']} {source.get('path')}"
              + (f" (retained {kept:.1%} of ||dW||_F^2)" if kept is not None else ""))  # fmt: skip

    out.result(doc, render)


def _inspect_peft(out: Output, path: Path) -> None:
    """A PEFT LoRA directory (what `convert --to peft-lora` writes): rank, parameters, bytes."""
    from ..convert import describe_peft_dir

    doc = {"path": str(path), **describe_peft_dir(path)}

    def render() -> None:
        p = out.out.print
        p(styled("[bold]{}[/]: ", path) + f"PEFT {doc['peft_type']} adapter ({doc['task_type']}), "
          f"rank {doc['rank']}, lora_alpha {doc['lora_alpha']}")  # fmt: skip
        p(f"  trainable:  {doc['params']:,} in {doc['modules']} modules"
          + (f" + {doc['head_params']:,} in the task head" if doc["head_params"] else ""))  # fmt: skip
        p("  files:      " + ", ".join(f"{n} {bytes_human(s)}" for n, s in doc["files"].items()))

    out.result(doc, render)
