"""How commands talk to people and scripts: rich on stderr, one JSON document on stdout with --json.

Also the error boundary: user errors become one line and a documented exit code; tracebacks
appear only with LORAXS_DEBUG=1. Nothing here imports torch.

Every console is made by `make_console`, with rich markup off: paths, names and every other text a
user provides are printed as they are (`[red]` in a path neither styles nor crashes anything, `[x]`
does not vanish). Styling is explicit: `styled("[bold]{}[/]: ...", path)` escapes its values.
The JSON document is strict JSON: a NaN or infinite number is written as null and named, with what
it was, under "non_finite".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import typer
from rich.console import Console
from rich.text import Text

from ..errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, LoraxsError
from ..fsutil import interrupt_guard, interrupted, raise_if_interrupted


def debug_enabled() -> bool:
    return os.environ.get("LORAXS_DEBUG", "").strip() not in {"", "0", "false", "no"}


class Output:
    """Per-invocation output settings: -v/-q/--json, before or after the command (options.py)."""

    def __init__(self, verbosity: int = 0, json_mode: bool = False):
        self.quiet = verbosity < 0  # -q, before or after the command: wins over any -v
        self.verbose = max(verbosity, 0)  # the -v count, before and after the command together
        self.json_mode = json_mode
        self.err = make_console(stderr=True)
        self.out = make_console(stderr=False)
        # Set when the command itself said what Ctrl-C left behind ("interrupted at step 12: ...").
        self.interrupt_noted = False

    @property
    def verbosity(self) -> int:
        """-1 with -q, else the number of -v."""
        return -1 if self.quiet else self.verbose

    @property
    def interactive(self) -> bool:
        return self.err.is_terminal and self.verbosity >= 0

    def info(self, message: str) -> None:
        """Progress notes: stderr, hidden by -q."""
        if self.verbosity >= 0:
            self.err.print(message)
            self.interrupt_noted = self.interrupt_noted or message.startswith("interrupted")

    def detail(self, message: str) -> None:
        """Extra detail shown with -v."""
        if self.verbosity > 0:
            self.err.print(message, style="dim")

    def warn(self, message: str) -> None:
        self.err.print(Text.assemble(("warning:", "yellow"), " ", message))

    def result(self, document: dict, view: Any = None, *, note: bool = False) -> None:
        """The one sink of a command's result: the document as one JSON document on stdout with
        --json, else its human view on stdout (`note`: on stderr, hidden by -q, for a summary of
        output written elsewhere).

        `view` is the human view of the document: a rich renderable or text, a list of them (printed
        in order), None (nothing), or a function of the document that returns one (built only when
        shown: the views are in the command modules, their pieces in render.py)."""
        stream = stdout_stream()
        if self.json_mode:
            stream.write(json_text(document) + "\n")
            stream.flush()
            return
        if callable(view):
            view = view(document)
        if note and self.verbosity < 0:
            return
        console = self.err if note else self.out
        for item in view if isinstance(view, list | tuple) else [view]:
            if item is not None:
                console.print(item)

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
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}", markup=False),  # shard names, paths: text
            ]
            with Progress(*columns, console=self.err, transient=False) as bar:
                task = bar.add_task(description, total=total, status="")

                def advance(n: int = 1, status: str = "") -> None:
                    raise_if_interrupted()  # a Ctrl-C swallowed by a library stops the work here
                    bar.update(task, advance=n, status=status)

                yield advance
            return
        state = {"done": 0, "last": 0.0}

        def advance_plain(n: int = 1, status: str = "") -> None:
            raise_if_interrupted()
            state["done"] += n
            now = time.monotonic()
            finished = total is not None and state["done"] >= total
            if self.verbosity >= 0 and (finished or now - state["last"] >= 10 or self.verbosity > 0):
                state["last"] = now
                of = f"/{total}" if total else ""
                self.err.print(f"{description}: {state['done']}{of} {status}".rstrip())

        yield advance_plain


class _Console(Console):
    """rich's Console, except that a broken pipe is an error like any other OSError (rich exits 1,
    the code of a bug, without a word); handle_errors reports it in one line."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def make_console(stderr: bool = True, **options: Any) -> Console:
    """The one way loraxs makes a rich console: markup off (text is printed as it is), no
    highlighting, long lines kept whole. Without a terminal (logs, CI, pipes) it is 120 columns wide
    instead of 80; a COLUMNS that is not a positive number (`COLUMNS=0`) is ignored, not obeyed."""
    settings: dict[str, Any] = {"markup": False, "highlight": False, "soft_wrap": True, **options}
    if "file" not in options:
        settings["stderr"] = stderr
    if "width" not in settings:
        columns = os.environ.get("COLUMNS", "").strip()
        if columns.isdigit() and int(columns) > 0:
            settings["width"] = int(columns)
        elif columns.isdigit():  # COLUMNS=0: rich would render everything in zero columns
            settings["width"] = _terminal_width(stderr) or 120
    console = _Console(**settings)
    if "width" not in settings and not console.is_terminal:
        console = _Console(**settings, width=120)
    return console


def _terminal_width(stderr: bool) -> int | None:
    stream = sys.stderr if stderr else sys.stdout
    try:
        return os.get_terminal_size(stream.fileno()).columns or None if stream.isatty() else None
    except (AttributeError, OSError, ValueError):
        return None


def styled(template: str, *values: Any) -> Text:
    """Rich markup for loraxs' own styling, user text as text: `styled("[bold]{}[/]: done", path)`.

    Each value is escaped before it goes into the template, so brackets in it print as they are."""
    from rich.markup import escape

    return Text.from_markup(template.format(*(escape(str(v)) for v in values)))


class StdoutClosed(LoraxsError):
    """Standard output is closed: the result has nowhere to go."""

    exit_code = EXIT_BAD_INPUT


def stdout_stream() -> IO[str]:
    """sys.stdout, or a one-line error when the process was started with it closed (`>&-`)."""
    if sys.stdout is None or getattr(sys.stdout, "closed", False) or _STDOUT_STATE["closed"]:
        raise StdoutClosed("standard output is closed: the result cannot be written (do not close it, >&-)")
    return sys.stdout


_STDOUT_STATE = {"closed": False}


def reserve_standard_streams() -> None:
    """At process start: a closed standard stream (fd 0, 1 or 2) is opened on the null device so no
    file the command opens later takes its number (and gets the output of a stray print); a closed
    stdout is remembered, and the result sink (`stdout_stream`) reports it in one line."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                _STDOUT_STATE["closed"] = True


def json_text(document: Any) -> str:
    """Strict JSON (no NaN or Infinity): each non-finite number becomes null, and the document (when
    it is an object) gets "non_finite": {dotted path: "NaN" | "Infinity" | "-Infinity"}."""
    notes: dict[str, str] = {}
    clean = _jsonable(document, "", notes)
    if notes and isinstance(clean, dict):
        clean["non_finite"] = {**(clean.get("non_finite") or {}), **notes}
    return json.dumps(clean, indent=2, allow_nan=False)


def _jsonable(value: Any, where: str, notes: dict[str, str]) -> Any:
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, dict):
        value = value.item()  # numpy and torch scalars
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        notes[where or "."] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}" if where else str(k), notes) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{where}[{i}]", notes) for i, v in enumerate(value)]
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def get_output(ctx: typer.Context) -> Output:
    """The invocation's Output (kept on the root context; made on first use)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Output):
        root.obj = Output()
    return root.obj


def handle_errors(function: Callable) -> Callable:
    """Wrap a command: LoraxsError -> one line + its exit code; Ctrl-C -> 130."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with interrupt_guard():
            try:
                result = function(*args, **kwargs)
            except typer.Exit as done:
                if interrupted() and done.exit_code == 0:
                    _interrupted(kwargs)
                raise
            except typer.Abort:
                raise
            except KeyboardInterrupt:
                _interrupted(kwargs)
            except Exception as error:
                if interrupted():  # what a library made of the KeyboardInterrupt it caught
                    _interrupted(kwargs)
                report_error(error)
            if interrupted():  # the command went on after Ctrl-C: still an interruption
                _interrupted(kwargs)
            return result

    return wrapper


def _interrupted(kwargs: dict):
    # One line: the command's own note of what it saved (train's checkpoint), else this.
    if not _command_output(kwargs).interrupt_noted:
        print_error("interrupted", plain=True)
    raise typer.Exit(EXIT_INTERRUPTED) from None


def report_error(error: Exception):
    """One line and the documented exit code for `error` (with LORAXS_DEBUG=1: the traceback)."""
    if isinstance(error, LoraxsError):
        if debug_enabled():
            raise error
        print_error(str(error))
        raise typer.Exit(error.exit_code) from None
    if debug_enabled():
        raise error
    problem = _io_problem(error)
    if problem:  # a full disk, a read-only directory, a closed pipe: not a bug
        print_error(problem)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    print_error(
        f"internal error: {type(error).__name__}: {error}".splitlines()[0]
        + " (set LORAXS_DEBUG=1 for a traceback)"
    )
    raise typer.Exit(1) from None


def _io_problem(error: Exception) -> str | None:
    """One line for an error of the file system rather than of loraxs, else None."""
    if isinstance(error, BrokenPipeError) or (isinstance(error, OSError) and error.errno == errno.EPIPE):
        _silence_stdout()
        return "standard output was closed by its reader (broken pipe): the output is incomplete"
    if isinstance(error, OSError) and error.errno == errno.EBADF and error.filename is None:
        return "standard output or error is closed (bad file descriptor): the output is incomplete"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}; check free space and permissions"
    # safetensors reports a failed write as SafetensorError("... I/O error: ... (os error N) ...")
    if type(error).__name__ == "SafetensorError" and "os error" in str(error):
        return f"{str(error).splitlines()[0]}; check free space and permissions"
    return None


def _command_output(kwargs: dict) -> Output:
    """The Output of the running command (found through its typer.Context argument)."""
    ctx = kwargs.get("ctx")
    root = ctx.find_root() if hasattr(ctx, "find_root") else None
    return root.obj if root is not None and isinstance(root.obj, Output) else Output()


def _silence_stdout() -> None:
    """After a broken pipe: point fd 1 at the null device, so the interpreter's final flush of
    sys.stdout does not fail again ("Exception ignored ... BrokenPipeError")."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (AttributeError, OSError, ValueError):
        pass


def print_error(message: str, *, plain: bool = False) -> None:
    """One line on stderr: `error: MESSAGE` (plain: MESSAGE alone, for an interruption)."""
    line = Text(message) if plain else Text.assemble(("error:", "bold red"), " ", message)
    with contextlib.suppress(OSError):  # stderr itself gone (a closed pipe): the exit code is left
        make_console(stderr=True).print(line)


def usage_line(error: typer.TyperException) -> str:
    """click's usage error as one line with the command's --help to try, e.g.
    "No such option: --foo (try 'loraxs train --help')"."""
    message = " ".join(error.format_message().split())
    # typer validates choices through pydantic, whose messages start with "Value error, ".
    message = message.replace(": Value error, ", ": ")
    command_path = getattr(getattr(error, "ctx", None), "command_path", None)
    if command_path:
        message = f"{message.rstrip('.')} (try '{command_path} --help')"
    return message


def quiet_library_progress(argv: list[str]) -> None:
    """Keep the libraries' own progress bars off stderr with --json, -q or no terminal.

    transformers' GGUF reader draws a bare tqdm bar ("Converting and de-quantizing GGUF tensors")
    that transformers.utils.logging.disable_progress_bar() does not reach, and huggingface_hub reads
    its switch when imported; both take their settings from the environment at import, so this
    runs first thing in a `loraxs` process, before torch or transformers are imported.
    """
    if sys.stderr is not None and sys.stderr.isatty() and not {"--json", "-q", "--quiet"} & set(argv):
        return
    for variable in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
