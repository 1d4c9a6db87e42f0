"""Helpers for the hardening tests: the CLI in process or as a subprocess, file snapshots, hostile file
systems.

Used by test_hardening.py (bad input), test_crash.py (SIGKILL, locks), test_robustness.py and test_fuzz.py.
A subprocess costs seconds of torch import: start one only where the process is what is tested (signals,
kills, RLIMIT, closed descriptors); run_inprocess gives the same Result for everything else.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from loraxs_cli.cli.app import app


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `python -m loraxs_cli` child: its own LORAXS_HOME, offline, no tracebacks."""
    env = {k: v for k, v in os.environ.items() if k != "LORAXS_DEBUG"}
    env.update(LORAXS_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", COLUMNS="200")
    env.setdefault("OMP_NUM_THREADS", "1")  # two children share two cores
    env.update(extra)
    return env


def cli_argv(*args) -> list[str]:
    return [sys.executable, "-m", "loraxs_cli", *(str(a) for a in args)]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def describe(self) -> str:
        return f"rc={self.returncode}\nstdout: {self.stdout[-800:]}\nstderr: {self.stderr[-1500:]}"


def run_cli(
    args: Sequence, home: Path, *, env: dict | None = None, preexec: Callable | None = None, timeout=300
) -> Result:
    started = time.monotonic()
    proc = subprocess.run(
        cli_argv(*args),
        env={**cli_env(home), **(env or {})},
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def run_inprocess(args: Sequence, home: Path, *, env: dict | None = None) -> Result:
    """run_cli's Result from CliRunner in this process: the same exit code, stdout and stderr.

    An exception that escaped the command (a bug: the real process would print an internal error or a
    traceback) is appended to stderr as its traceback, so "Traceback" checks see it."""
    started = time.monotonic()
    full_env = {"LORAXS_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "LORAXS_DEBUG": None}
    result = CliRunner().invoke(app, [str(a) for a in args], env={**full_env, **(env or {})})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return Result(result.exit_code, result.stdout, stderr, time.monotonic() - started)


def popen_cli(args: Sequence, home: Path, *, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        cli_argv(*args),
        env={**cli_env(home), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        text=True,
        **kwargs,
    )


def assert_one_line_error(result: Result, code: int) -> None:
    """The documented exit code, exactly one `error:` line, no traceback, not an internal error."""
    assert result.returncode == code, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.error_lines) == 1, result.describe()
    assert "internal error" not in result.stderr, result.describe()


def limit_file_size(limit: int) -> Callable[[], None]:
    """preexec_fn of a child on a 'full disk': writes past `limit` bytes fail with EFBIG."""

    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def not_a_directory(tmp: Path) -> Path:
    """An output path no process can create, root included: its parent is a regular file.

    chmod does not stop root, and a read-only bind mount needs privileges a test does not have."""
    blocker = tmp / "a-regular-file"
    blocker.write_text("not a directory\n")
    return blocker / "out"


def sha256_tree(*roots: Path) -> dict[str, str]:
    """Path -> sha256 of every file under the roots (a missing root maps to 'absent')."""
    found: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            found[str(root)] = "absent"
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files of `before` that are gone or hold other bytes in `after` (new files are not counted)."""
    return sorted(path for path, digest in before.items() if after.get(path) != digest)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.0005) -> bool:
    """Poll until predicate() is true; False on timeout (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL and reap: nothing of the process runs after this returns."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


class Watched:
    """A CLI child whose stderr lines are collected by a thread, so a test can wait for one of them."""

    def __init__(self, args: Sequence, home: Path, **kwargs):
        self.proc = popen_cli(args, home, **kwargs)
        self.lines: list[str] = []
        self._stdout: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stdout, self._stdout), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _drain(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def cpu_ticks(self) -> int:
        """User + system clock ticks of the child so far (0 once it is gone)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])

    def idle(self, quiet_s: float = 1.5, timeout: float = 120) -> bool:
        """Wait until the child uses no CPU for `quiet_s` (it sleeps on a lock); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_ticks()
            time.sleep(quiet_s)
            if self.proc.poll() is not None or self.cpu_ticks() == before:
                return self.proc.poll() is None
        return False

    def kill(self) -> None:
        kill_hard(self.proc)

    def result(self, timeout: float = 300) -> Result:
        self.proc.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=30)
        return Result(self.proc.returncode, "".join(self._stdout), "".join(self.lines))
