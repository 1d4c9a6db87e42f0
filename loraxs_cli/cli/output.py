"""How commands talk to people and scripts: rich on stderr, one JSON document on stdout with --json.

Also the error boundary: user errors become one line and a documented exit code; tracebacks
appear only with LORAXS_DEBUG=1. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from ..errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, LoraxsError


def debug_enabled() -> bool:
    return os.environ.get("LORAXS_DEBUG", "").strip() not in {"", "0", "false", "no"}


class Output:
    """Per-invocation output settings (global -v/-q/--json, or the command's own --json)."""

    def __init__(self, verbosity: int = 0, json_mode: bool = False):
        self.verbosity = verbosity
        self.json_mode = json_mode
        self.err = _console(stderr=True)
        self.out = _console(stderr=False)

    @property
    def interactive(self) -> bool:
        return self.err.is_terminal and self.verbosity >= 0

    def info(self, message: str) -> None:
        """Progress notes: stderr, hidden by -q."""
        if self.verbosity >= 0:
            self.err.print(message)

    def detail(self, message: str) -> None:
        """Extra detail shown with -v."""
        if self.verbosity > 0:
            self.err.print(message, style="dim")

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {message}")

    def result(self, document: dict, render: Callable[[], None]) -> None:
        """The command's result: one JSON document on stdout with --json, else a human rendering."""
        if self.json_mode:
            sys.stdout.write(json.dumps(document, indent=2, default=_json_default) + "\n")
            sys.stdout.flush()
        else:
            render()

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """Yields advance(n=1, **fields). Rich bar on a terminal; a few plain lines otherwise."""
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = [
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            ]
            with Progress(*columns, console=self.err, transient=False) as bar:
                task = bar.add_task(description, total=total, status="")

                def advance(n: int = 1, status: str = "") -> None:
                    bar.update(task, advance=n, status=status)

                yield advance
            return
        state = {"done": 0, "last": 0.0}

        def advance_plain(n: int = 1, status: str = "") -> None:
            state["done"] += n
            now = time.monotonic()
            finished = total is not None and state["done"] >= total
            if self.verbosity >= 0 and (finished or now - state["last"] >= 10 or self.verbosity > 0):
                state["last"] = now
                of = f"/{total}" if total else ""
                self.err.print(f"{description}: {state['done']}{of} {status}".rstrip())

        yield advance_plain


def _console(stderr: bool) -> Console:
    """Rich console; without a terminal (logs, CI, pipes) tables get 120 columns instead of 80."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, soft_wrap=True, width=120)
    return console


def _json_default(value: Any):
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def get_output(ctx: typer.Context, json_flag: bool = False) -> Output:
    root = ctx.find_root()
    out = root.obj if isinstance(root.obj, Output) else Output()
    if json_flag:
        out.json_mode = True
    root.obj = out
    return out


def handle_errors(function: Callable) -> Callable:
    """Wrap a command: LoraxsError -> one line + its exit code; Ctrl-C -> 130."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except LoraxsError as error:
            if debug_enabled():
                raise
            _print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            _print_error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as error:
            if debug_enabled():
                raise
            problem = _io_problem(error)
            if problem:  # a full disk, a read-only directory, a file-size limit: not a bug
                _print_error(problem)
                raise typer.Exit(EXIT_BAD_INPUT) from None
            _print_error(
                f"internal error: {type(error).__name__}: {error}".splitlines()[0]
                + " (set LORAXS_DEBUG=1 for a traceback)"
            )
            raise typer.Exit(1) from None

    return wrapper


def _io_problem(error: Exception) -> str | None:
    """One line for an error of the file system rather than of loraxs, else None."""
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}; check free space and permissions"
    # safetensors reports a failed write as SafetensorError("... I/O error: ... (os error N) ...")
    if type(error).__name__ == "SafetensorError" and "os error" in str(error):
        return f"{str(error).splitlines()[0]}; check free space and permissions"
    return None


def _print_error(message: str) -> None:
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}")
