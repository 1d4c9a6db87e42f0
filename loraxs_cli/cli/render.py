"""Shared rich renderings (tables, byte sizes) for the command modules."""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from ..estimate import human_bytes as bytes_human  # noqa: F401 - re-exported for the commands


def module_kind(name: str) -> str:
    """'layers.3.self_attn.q_proj' -> 'self_attn.q_proj' (the layer index removed)."""
    return re.sub(r"^(.*?\.)?\d+\.", "", name)


def short_kinds(kinds: Sequence[str]) -> list[str]:
    """Each module kind by its shortest dotted suffix that no other kind ends with:
    ['self_attn.q_proj', 'mlp.up_proj'] -> ['q_proj', 'up_proj'], while BERT's
    'attention.output.dense' and 'output.dense' stay apart."""

    def ends_with(kind: str, suffix: str) -> bool:
        return kind == suffix or kind.endswith("." + suffix)

    shown = []
    for kind in kinds:
        parts = kind.split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            if not any(ends_with(other, suffix) for other in kinds if other != kind):
                break
        shown.append(suffix)
    return shown


def fits_whole(console: Console, table: Table, texts: Sequence[str]) -> bool:
    """Whether `table` fits the console's width without squeezing a column below its longest word,
    and shows every one of `texts` whole on one line (ids that `cache rm` takes by copy and paste)."""
    from rich.measure import Measurement

    unbounded = console.options.update_width(100_000)  # a table's measure is clamped to the width
    if Measurement.get(console, unbounded, table).minimum > console.width:
        return False
    probe = Console(width=console.width, file=io.StringIO(), color_system=None, highlight=False, markup=False)
    probe.print(table)
    lines = probe.file.getvalue().splitlines()
    return all(any(text in line for line in lines) for text in texts)


def energy_table(
    console: Console, modules: list[dict], *, rank: int, r_max: int, full: bool, of: str = "W"
) -> None:
    """Captured energy per module (with -v) or per module kind (mean, min over layers).

    `of` names the matrix whose truncated SVD made the factors: W (LoRA-XS) or dW (LoRA-SB)."""
    title = f"share of ||{of}||_F^2 kept at rank {rank}" + (
        f" (entry has r_max {r_max})" if r_max != rank else ""
    )
    table = Table(title=title, title_justify="left")
    if full:
        table.add_column("module")
        table.add_column("shape", justify="right")
        table.add_column("energy", justify="right")
        for m in modules:
            table.add_row(m["name"], "x".join(map(str, m["shape"])), f"{m['energy']:.3f}")
    else:
        groups: dict[str, list[dict]] = defaultdict(list)
        for m in modules:
            groups[module_kind(m["name"])].append(m)
        table.add_column("module")
        table.add_column("layers", justify="right")
        table.add_column("shape", justify="right")
        table.add_column("energy mean", justify="right")
        table.add_column("min", justify="right")
        for kind, items in groups.items():
            energies = [m["energy"] for m in items]
            table.add_row(
                kind,
                str(len(items)),
                "x".join(map(str, items[0]["shape"])),
                f"{sum(energies) / len(energies):.3f}",
                f"{min(energies):.3f}",
            )
    console.print(table)
