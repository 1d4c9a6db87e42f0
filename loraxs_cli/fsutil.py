"""File-system primitives shared by every command that reads user paths or writes an output.

One implementation of each rule, so no command can get it wrong on its own:

- **Atomic outputs** (`atomic_dir`, `atomic_path`, `atomic_file`, `write_text_atomic`, `publish_dir`):
  everything is written into a temporary sibling (`.NAME.tmp-PID-HEX`), its files get the
  permissions the umask gives (safetensors creates its files 0600 whatever the umask), are fsynced,
  and the temporary is renamed into place, the parent directory fsynced after. A failure, a kill or
  Ctrl-C leaves the previous output as it was and removes the temporary (a kill cannot: its
  temporary is removed by the next write to the same directory, see below).
- **Ctrl-C** (`interrupt_guard`, `raise_if_interrupted`): Python raises KeyboardInterrupt wherever
  the main thread happens to be, including places that swallow it: a finalizer (`__del__`, a weakref
  callback: "Exception ignored in ..." and the program goes on), a library's broad `except` (an
  import inside transformers turns it into another error). A SIGINT therefore also sets a flag, and
  nothing is published once it is set: `atomic_*` check it before the rename.
- **Outputs never overlap inputs** (`check_output`): an output that is an input, lies inside one or
  contains one is refused before anything is written, with or without --force (real paths: symlinks
  resolved, hard links compared by inode).
- **Names that build paths** (`safe_name`): one plain path component, on one line.
- **Only regular files are opened** (`require_regular_file`): a FIFO, a device or a directory where a
  file is expected is refused instead of blocking forever on open().
- **Stale temporaries** (`clean_stale_temps`): the temporaries of processes that no longer exist
  (the pid is part of the name) are removed by the next write into the same directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from .errors import BadInputError
from .paths import temp_sibling

# `.NAME.tmp-PID-HEX` (a write in progress) and `.NAME.old-PID-HEX` (an output being replaced).
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{6,32})$")


# ----------------------------------------------------------------------------------------------
# Ctrl-C


_SIGINT_SEEN = threading.Event()


def interrupted() -> bool:
    """Whether SIGINT arrived while an `interrupt_guard` was active (even if its KeyboardInterrupt was
    swallowed somewhere)."""
    return _SIGINT_SEEN.is_set()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed: call before anything irreversible."""
    if interrupted():
        raise KeyboardInterrupt


@contextmanager
def _handling(signum: int, handler: Callable, restore) -> Iterator[None]:
    """`handler` for `signum` for the duration, then `restore` (the previous handler when it is None). A
    signal the process inherited as ignored stays ignored (as Python itself does for SIGINT), and outside
    the main thread, where Python allows no handlers, nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signum)
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signum, handler(previous))
    try:
        yield
    finally:
        signal.signal(signum, previous if previous is not None else restore)


@contextmanager
def interrupt_guard() -> Iterator[None]:
    """For the duration, SIGINT sets the interrupt flag, then raises KeyboardInterrupt as usual.

    Installed by the CLI around every command. The flag is cleared when the block ends: a program that
    goes on (a test session) starts clean."""

    def on_sigint(previous):
        def handle(signum, frame) -> None:
            _SIGINT_SEEN.set()
            if callable(previous) and previous is not signal.default_int_handler:
                previous(signum, frame)
            raise KeyboardInterrupt

        return handle

    _SIGINT_SEEN.clear()
    try:
        with _handling(signal.SIGINT, on_sigint, signal.default_int_handler):
            yield
    finally:
        _SIGINT_SEEN.clear()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the duration (train), SIGTERM (a scheduler's preemption, `kill`) is handled like Ctrl-C: the
    SIGINT handler runs (interrupt_guard's sets the flag), and KeyboardInterrupt stops the loop, which
    writes its checkpoint."""

    def on_sigterm(previous):
        def handle(signum, frame) -> None:
            sigint = signal.getsignal(signal.SIGINT)
            if callable(sigint):
                sigint(signal.SIGINT, frame)
            raise KeyboardInterrupt

        return handle

    with _handling(signal.SIGTERM, on_sigterm, signal.SIG_DFL):
        yield


# ----------------------------------------------------------------------------------------------
# names, inputs and outputs


def loads_json(text: str | bytes):
    """json.loads for files a user or another tool wrote: nesting too deep for the parser (a crafted
    `[[[[...]]]]`) is a ValueError like any other malformed JSON, which every reader turns into a
    one-line bad-input error, rather than a RecursionError that would end in "internal error"."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def safe_name(name: object, what: str = "name") -> str:
    """`name` if it is one plain path component (no separator, not `.`/`..`, not absolute, no control
    character or newline), else a one-line BadInputError. Every name that becomes part of a path
    (pack members, cache ids) goes through here."""
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{what} {name!r} is not a valid name: it must be a non-empty string")
    bad = (
        name in (".", "..")
        or "/" in name
        or "\\" in name
        or (os.altsep is not None and os.altsep in name)
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or Path(name).is_absolute()
        or Path(name).drive != ""
    )
    if bad:
        raise BadInputError(
            f"{what} {name!r} is not a valid name: it must be one plain path component "
            "(no '/', '\\', '..', absolute path or control character)"
        )
    return name


def require_regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is (a symlink to) a regular file; a FIFO, socket, device or directory is refused
    (opening a FIFO would block forever), a missing file too. Call before opening a user's file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such {what}") from None
    except OSError as error:
        raise BadInputError(f"{path}: cannot read this {what} ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a directory"
            if stat.S_ISDIR(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise BadInputError(f"{path}: is {kind}, not a regular {what}; give a regular file")
    return path


def _real(path: Path) -> Path:
    """The absolute path with every symlink resolved (the part that exists; the rest as written)."""
    return Path(os.path.realpath(path.expanduser()))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    out: str | Path,
    inputs: Mapping[str, str | Path | None] | Iterable[str | Path | None],
    *,
    force: bool,
    option: str = "--out",
) -> Path:
    """Refuse an output that would destroy an input, then one that exists without --force.

    `inputs` are paths, or {what it is: path} ("the adapter": DIR) for the message; None is skipped.
    The output may not be an input, lie inside one, or contain one (real paths: `..`, symlinks and
    hard links do not hide the overlap); with or without `force`. Returns the output path."""
    path = Path(out).expanduser()
    real_out = _real(path)
    labelled = inputs.items() if isinstance(inputs, Mapping) else (("the input", i) for i in inputs)
    for label, source in labelled:
        if source is None:
            continue
        given = Path(source).expanduser()
        if not (given.exists() or given.is_symlink()):
            continue  # nothing there to destroy (a hub id, or a missing input that fails on its own)
        real_in = _real(given)
        if real_out == real_in or _same(path, given):
            relation = "is"
        elif real_out.is_relative_to(real_in):
            relation = "lies inside"
        elif real_in.is_relative_to(real_out):
            relation = "contains"
        else:
            continue
        raise BadInputError(
            f"{option} {path} {relation} {label} ({given}): writing it would destroy an input; "
            f"choose an {option} outside the inputs (with or without --force)"
        )
    return require_absent(path, force=force)


def require_absent(out: str | Path, *, force: bool) -> Path:
    """The one exists/--force check of every output: `out` unless it exists (a dangling symlink
    counts) and `force` is off, a one-line BadInputError then. Returns `out` as a Path."""
    path = Path(out)
    if (path.exists() or path.is_symlink()) and not force:
        raise BadInputError(f"{path} exists; pass --force to replace it")
    return path


# ----------------------------------------------------------------------------------------------
# temporaries


def temp_path(target: str | Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `target` that names its owner: `.NAME.tmp-PID-HEX` (`kind` "old": an
    output moved aside while its replacement goes in, `.NAME.old-PID-HEX`). A name near the file-name
    limit is cut (paths.temp_sibling)."""
    tmp = temp_sibling(target)
    if kind == "tmp":
        return tmp
    head, _, tail = tmp.name.rpartition(".tmp-")
    return tmp.with_name(f"{head}.{kind}-{tail}")


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user counts)."""
    if pid <= 0:
        return True  # not a process id: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(directory: str | Path, pattern: re.Pattern[str] = TEMP_PATTERN) -> list[Path]:
    """Remove the temporaries in `directory` (names matching `pattern`, whose `pid` group names the
    owner) of processes that no longer exist; returns what was removed. The owner's pid is in the
    name, so a write in progress is never touched (on one machine: a directory shared over the
    network with other machines' writers is outside what a pid can tell)."""
    removed = []
    try:
        children = list(Path(directory).iterdir())
    except OSError:
        return removed
    for child in children:
        match = pattern.match(child.name)
        if match is None or process_alive(int(match.group("pid"))):
            continue
        if match.groupdict().get("kind") == "old" and not _recover_moved_aside(child, match["name"]):
            continue
        try:
            _remove(child)
        except OSError:
            continue
        removed.append(child)
    return removed


def _recover_moved_aside(old: Path, name: str) -> bool:
    """An output moved aside by a process killed before its replacement went in: put it back when
    its place is empty. True if `old` is now garbage (the replacement is in place)."""
    target = old.parent / name
    if target.exists() or target.is_symlink():
        return True
    if "~" not in name:  # an exact name, not one cut to the file-name limit (paths.temp_sibling)
        with suppress(OSError):
            os.rename(old, target)
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_quietly(path: Path) -> None:
    try:
        _remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# permissions and durability


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_file(path: str | Path, mode: int | None = None) -> None:
    """Give a freshly written file the umask's permissions and flush it to disk."""
    os.chmod(path, (0o666 & ~current_umask()) if mode is None else mode)
    fsync_path(path)


def finish_tree(root: str | Path) -> None:
    """`finish_file` for every file under `root`, then the directories, bottom-up."""
    mask = current_umask()
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                finish_file(path, 0o666 & ~mask)
        os.chmod(directory, 0o777 & ~mask)
        fsync_path(directory)


# ----------------------------------------------------------------------------------------------
# atomic outputs


def publish_dir(new: str | Path, target: str | Path, *, replace: bool = True) -> None:
    """Put the finished directory `new` at `target`. An existing target (with `replace`) is renamed
    aside first (`.NAME.old-PID-HEX`) and removed only once `new` is in place; if the second rename
    fails it is put back. The parent directory is fsynced."""
    new, target = Path(new), require_absent(target, force=replace)
    if target.exists() or target.is_symlink():
        old = temp_path(target, "old")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        fsync_path(target.parent)
        _remove_quietly(old)
    else:
        os.rename(new, target)
        fsync_path(target.parent)


@contextmanager
def atomic_dir(
    target: str | Path,
    *,
    replace: bool = True,
    publish_interrupted: bool = False,
    temp: str | Path | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; when the block ends normally its files are
    given the umask's permissions and fsynced and it is published at `target` (`publish_dir`). On an
    exception, or after Ctrl-C (unless `publish_interrupted`: a checkpoint written on purpose when
    interrupted), it is removed and the previous `target` is left as it was. `temp` names the
    temporary (a sibling whose name a reader of the parent skips) instead of `temp_path(target)`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent)
    tmp = temp_path(target) if temp is None else Path(temp)
    try:
        tmp.mkdir()  # inside the try: a Ctrl-C right after it still removes it
        yield tmp
        finish_tree(tmp)
        if not publish_interrupted:
            raise_if_interrupted()
        publish_dir(tmp, target, replace=replace)
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextmanager
def atomic_path(
    target: str | Path, *, replace: bool = True, publish_interrupted: bool = False
) -> Iterator[Path]:
    """Yield a temporary file path beside `target` for a writer that needs a path (safetensors'
    save_file); published like `atomic_dir`, by one rename over the old file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent)
    tmp = temp_path(target)
    try:
        yield tmp
        finish_file(tmp)
        if not publish_interrupted:
            raise_if_interrupted()
        require_absent(target, force=replace)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(target: str | Path, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yield an open handle on a temporary file beside `target`, published like `atomic_path`."""
    binary = "b" in mode
    with atomic_path(target) as tmp, open(tmp, mode, encoding=None if binary else encoding) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` atomically (a kill or a full disk never leaves half a file)."""
    with atomic_file(path) as handle:
        handle.write(text)
