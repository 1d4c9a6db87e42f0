"""The human views of the commands' result documents (rich text and tables), for `Output.result`.

A command builds its result document (what --json prints) and a view of that document from the
pieces here; Output.result prints one or the other. Views are data (renderables), not printing code.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

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


def energy_table(modules: list[dict], *, rank: int, r_max: int, full: bool, of: str = "W") -> Table:
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
    return table


Row = tuple[str, "str | Text"] | str | Text | None


@dataclass
class Fields:
    """A heading, then one `  label: value` line per row, the values aligned at column `width` + 2
    (0: not aligned). A text row is a line as it is; a None row is left out (rows that only some
    results have)."""

    heading: Text | str | None
    rows: Sequence[Row]
    width: int = 10

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.heading is not None:
            yield Text(self.heading) if isinstance(self.heading, str) else self.heading
        for row in self.rows:
            if isinstance(row, str | Text):  # a line of its own, as it is
                yield Text(row) if isinstance(row, str) else row
            elif row is not None:
                label, value = row
                yield Text.assemble(f"  {label}:" + " " * max(self.width - len(label) - 1, 1), value)


def table(
    title: str | None, columns: Sequence[str | tuple[str, dict]], rows: Sequence[Sequence], **options
) -> Table:
    """A rich Table: each column a name (right-aligned but the first) or (name, Table.add_column options)."""
    view = Table(title=title, **options)
    for number, column in enumerate(columns):
        name, settings = column if isinstance(column, tuple) else (column, {})
        view.add_column(name, **{"justify": "left" if number == 0 else "right", **settings})
    for row in rows:
        view.add_row(*row)
    return view
