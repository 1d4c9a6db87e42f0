"""Print the package's module import graph, its cycles, and its largest files and functions.

    python scripts/import_graph.py            # edges, cycles, upward imports, sizes
    python scripts/import_graph.py --json     # the same as one JSON document

Reads the source with `ast` (nothing is imported, so it runs without torch). An edge A -> B means A
imports B at module top or inside a function (marked "lazy"). A cycle is a strongly connected group of
two or more modules (Tarjan's algorithm, from the standard library's graphlib it cannot be had: graphlib
only reports that a cycle exists).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "loraxs_cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        anchor = current.split(".") if is_package else current.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, node.module] if node.module else anchor)
    names = [base]
    names += [f"{base}.{alias.name}" for alias in node.names]  # `from . import cache` imports a module
    return names


def collect(modules: dict[str, Path]) -> tuple[dict[str, dict[str, str]], dict[str, int], list[tuple]]:
    edges: dict[str, dict[str, str]] = {m: {} for m in modules}
    lines: dict[str, int] = {}
    functions: list[tuple] = []
    nested: dict[str, int] = {}  # every import inside a function (any library), per module
    for name, path in modules.items():
        text = path.read_text()
        lines[name] = len(text.splitlines())
        tree = ast.parse(text)
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}", node.lineno))
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = resolve(name, path.name == "__init__.py", node)
            kind = "top" if id(node) in top_level else "lazy"
            if targets and kind == "lazy":
                nested[name] = nested.get(name, 0) + 1
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                internal = target and target != name and target.startswith(PACKAGE)
                if internal and edges[name].get(target) != "top":
                    edges[name][target] = kind
    return edges, lines, functions, nested


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest files and functions")
    args = parser.parse_args()
    modules = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    edges, lines, functions, nested = collect(modules)
    lazy = sum(kind == "lazy" for targets in edges.values() for kind in targets.values())
    doc = {
        "modules": len(modules),
        "edges": {m: dict(sorted(t.items())) for m, t in sorted(edges.items())},
        "cycles": cycles(edges),
        "lazy_imports_in_core": sum(
            kind == "lazy"
            for m, targets in edges.items()
            if not m.startswith(f"{PACKAGE}.cli")
            for kind in targets.values()
        ),
        "lazy_imports": lazy,
        "imports_inside_functions_in_core": sum(
            n for m, n in nested.items() if not m.startswith(f"{PACKAGE}.cli")
        ),
        "largest_files": sorted(((n, m) for m, n in lines.items()), reverse=True)[: args.top],
        "largest_functions": sorted(functions, reverse=True)[: args.top],
        "total_lines": sum(lines.values()),
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return
    short = lambda m: m.removeprefix(f"{PACKAGE}.") or PACKAGE  # noqa: E731
    print(f"{doc['modules']} modules, {doc['total_lines']} lines")
    for module, targets in doc["edges"].items():
        if targets:
            shown = ", ".join(short(t) + ("*" if kind == "lazy" else "") for t, kind in targets.items())
            print(f"  {short(module)} -> {shown}")
    print("  (* imported inside a function)")
    print(f"import cycles: {len(doc['cycles'])}")
    for group in doc["cycles"]:
        print("  " + " <-> ".join(map(short, group)))
    print(
        f"package-internal imports inside functions: {doc['lazy_imports']} "
        f"({doc['lazy_imports_in_core']} in core)"
    )
    print(
        f"imports of any library inside functions, core (not cli/): {doc['imports_inside_functions_in_core']}"
    )
    print("largest files:")
    for n, m in doc["largest_files"]:
        print(f"  {n:5d}  {short(m)}")
    print("largest functions:")
    for n, name, line in doc["largest_functions"]:
        print(f"  {n:5d}  {short(name)} (line {line})")


if __name__ == "__main__":
    main()
