"""The run directory of `loraxs train`, one class for everything written there:

    RUN/config.yaml          the resolved settings (config.settings_document) and what the run recorded
    RUN/metrics.jsonl        step, loss, lr, tokens/s; eval rows
    RUN/checkpoints/step-N/  state.json + state.safetensors (no pickles, see checkpoint.py): R, head,
                             optimizer, scheduler, RNG, data position
    RUN/adapter/             the final adapter;  RUN/best/  the best by --metric
    RUN/loss.png             the loss curve
    RUN/trackers.json        --report-to: each tracker's run and the last step sent (trackers.py)
    RUN/tensorboard/         --report-to tensorboard: the event files
    RUN/.train.lock          held while a `train` runs in RUN (released by the OS when it dies)

Writes are atomic (fsutil): a kill leaves the previous file or checkpoint, never half of one, and the
temporaries of dead processes are removed by the next run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from .. import __version__
from ..adapter import is_adapter_dir
from ..checkpoint import LegacyCheckpointError, is_checkpoint, load_state, save_state
from ..errors import BadInputError
from ..fsutil import clean_stale_temps, finish_tree, loads_json, publish_dir, write_text_atomic
from .config import (
    CONFIG_HEADER,
    IDENTITY,
    IDENTITY_ADDED,
    RECORDED,
    TrainConfig,
    config_from_document,
    settings_document,
)

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LOCK_FILE = ".train.lock"
TRACKERS_FILE = "trackers.json"  # --report-to: each tracker's run and what it was sent (trackers.py)
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard: event files only
# What an earlier run left in its directory, by name: `--force` removes exactly these and nothing else.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, PLOT_FILE, TRACKERS_FILE)
RUN_ADAPTERS = ("adapter", "best")
RUN_TEMP_PREFIXES = (
    ".config.yaml.tmp-", ".metrics.jsonl.tmp-", ".adapter.tmp-", ".adapter.old-", ".best.tmp-",
    ".best.old-", ".write-test-", ".trackers.json.tmp-",
)  # fmt: skip
# A checkpoint being written: checkpoints/.tmp-step-STEP-PID-HEX (the pid names its owner).
CHECKPOINT_TEMP = re.compile(r"^\.tmp-step-(?P<step>\d+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{6,32})$")
CHECKPOINT_TEMP_PREFIXES = (".tmp-step-", ".step-")  # the second: a step-N moved aside (fsutil)


@dataclass
class RunStart:
    """What `train` does with --out; `train --dry-run` reports the same, from the same code."""

    action: str  # "new", "resume" (from `found`) or "fresh" (remove `replaces`, then a new run)
    found: tuple[Path, dict] | None = None
    replaces: list[Path] = field(default_factory=list)

    def describe(self) -> str | None:
        if self.action == "resume":
            return f"from {self.found[0]} (step {self.found[1]['step']})"
        return None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.config_file = self.path / CONFIG_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.adapter = self.path / "adapter"
        self.best = self.path / "best"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------
    # What to do with it: resume, start, replace

    def plan(self, config: TrainConfig) -> RunStart:
        """Resume, start, or (resume="fresh", `--force`) replace the run here; refuses what `train` would
        refuse (exit 3): a checkpoint with other settings, a checkpoint with --no-resume, none with
        --resume."""
        if self.path.exists() and not self.path.is_dir():
            raise BadInputError(f"--out {self.path} is a file, not a run directory")
        if config.resume == "fresh":
            replaces = self.earlier_run()
            return RunStart("fresh", replaces=replaces) if replaces else RunStart("new")
        found = self.latest_checkpoint() if self.path.is_dir() else None
        if config.resume == "always" and found is None:
            raise BadInputError(f"--resume: no checkpoint in {self.path}")
        if found and config.resume == "never":
            raise BadInputError(
                f"{self.path} holds checkpoints of an earlier run; resume it (default), replace it with "
                "--force, or use another --out"
            )
        if found:
            saved = {**IDENTITY_ADDED, **found[1].get("identity", {})}  # an older checkpoint: the defaults
            changed = sorted(k for k in IDENTITY if saved.get(k) != config.identity().get(k))
            if changed:
                raise BadInputError(
                    f"{self.path} holds a run with other settings ({', '.join(changed)}); use another "
                    "--out, or --force to replace that run"
                )
            return RunStart("resume", found)
        return RunStart("new")

    def earlier_run(self) -> list[Path]:
        """The files and directories `train` wrote here (never a symlink, never anything else).

        A directory that holds such names but neither a `train` config nor a checkpoint is not taken
        for a run directory: nothing in it is removed (BadInputError)."""
        if not self.path.is_dir():
            return []

        def own(path: Path) -> bool:
            return path.exists() and not path.is_symlink()

        root = self.path
        found = [root / n for n in RUN_FILES if own(root / n) and (root / n).is_file()]
        found += [root / n for n in RUN_ADAPTERS if own(root / n) and is_adapter_dir(root / n)]
        if own(root / TENSORBOARD_DIR) and _holds_only_events(root / TENSORBOARD_DIR):
            found.append(root / TENSORBOARD_DIR)
        found += [p for p in root.iterdir() if p.name.startswith(RUN_TEMP_PREFIXES) and not p.is_symlink()]
        if own(self.checkpoints) and self.checkpoints.is_dir():
            found += [
                p
                for p in self.checkpoints.iterdir()
                if not p.is_symlink()
                and (p.name.startswith(CHECKPOINT_TEMP_PREFIXES) or p.name.removeprefix("step-").isdigit())
            ]
        if found and not (self.holds_train_config() or self.checkpoint_dirs()):
            raise BadInputError(
                f"{root} is not a loraxs run directory (no config.yaml of `loraxs train`, no checkpoint); "
                "--force removes nothing there: use another --out"
            )
        return sorted(found)

    def remove(self, paths: list[Path]) -> None:
        """Remove what `earlier_run` listed (`--force`)."""
        for path in paths:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as error:
                raise BadInputError(f"--force: cannot remove {path}: {error.strerror}") from None
        root = self.checkpoints
        if root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
            root.rmdir()

    def create(self) -> None:
        """Make the directory and check that it can be written (one line, exit 3, if not)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise BadInputError(f"cannot write the run directory {self.path}: {error.strerror}") from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for one `train` process: a second one refuses (exit 3) instead of
        writing into the same files. The OS releases the lock when its process dies, so the lock file a
        killed run leaves behind does not block the next one."""
        lock = FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise BadInputError(
                f"{self.path} is in use by another `loraxs train` (it holds {LOCK_FILE}); wait for it "
                "to finish or use another --out"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def remove_if_empty(self) -> None:
        """Remove the directory if nothing but the lock file is in it (a run refused before training)."""
        try:
            if all(p.name == LOCK_FILE for p in self.path.iterdir()):
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()
        except OSError:
            pass

    def clean_stale_temps(self) -> None:
        """Remove the temporaries of killed processes: checkpoints being written, config, metrics or
        adapter writes (and put back an adapter a killed process had moved aside)."""
        clean_stale_temps(self.path)
        clean_stale_temps(self.checkpoints)
        clean_stale_temps(self.checkpoints, CHECKPOINT_TEMP)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is complete once it has its final name)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.name.startswith("step-") and is_checkpoint(p)]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))

    def latest_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest readable checkpoint; damaged ones (e.g. killed mid-write by an old version) are
        skipped. A pickled checkpoint of an older loraxs is refused (exit 3), never unpickled nor skipped."""
        for path in reversed(self.checkpoint_dirs()):
            try:
                return path, load_state(path)
            except LegacyCheckpointError:
                raise
            except BadInputError:
                continue
        return None

    def save_checkpoint(self, step: int, state: dict, keep: int) -> Path:
        """Write checkpoints/step-N atomically (temp dir, fsync, rename); prune to the `keep` newest.
        Published also after Ctrl-C or SIGTERM: that is when the last one is written on purpose."""
        root = self.checkpoints
        root.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(root, CHECKPOINT_TEMP)
        final = root / f"step-{step}"
        tmp = root / f".tmp-step-{step}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir()
            try:
                save_state(tmp, state)
            except OSError as error:
                reason = error.strerror or "the write failed"
                raise BadInputError(
                    f"cannot write checkpoint {final}: {reason}; free disk space or use another --out"
                ) from None
            finish_tree(tmp)
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoint_dirs()[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------------------------------
    # metrics.jsonl

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def trim_metrics(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file reads as one uninterrupted run
        (`step` -1: a fresh start keeps no rows)."""
        if not self.metrics_file.is_file():
            return
        kept = [line for line in self.metrics_file.read_text().splitlines() if _logged_step(line) <= step]
        write_text_atomic(self.metrics_file, "".join(line + "\n" for line in kept))

    def metrics(self) -> list[dict]:
        return [loads_json(line) for line in self.metrics_file.read_text().splitlines() if line]

    # ------------------------------------------------------------------------------------------
    # config.yaml

    def write_config(self, config: TrainConfig, recorded: dict) -> None:
        document = self.config_document(config, recorded)
        write_text_atomic(self.config_file, CONFIG_HEADER + yaml.safe_dump(document, sort_keys=False))

    @staticmethod
    def config_document(config: TrainConfig, recorded: dict) -> dict:
        """What config.yaml holds (the trackers of --report-to get it too): the settings and `recorded:`."""
        return {**settings_document(config), RECORDED: {**recorded, "loraxs_version": __version__}}

    def read_config(self) -> TrainConfig:
        """The settings config.yaml holds (of this or an older version), as a TrainConfig."""
        if not self.holds_train_config():
            raise BadInputError(f"{self.config_file}: not a config.yaml of `loraxs train`")
        return config_from_document(yaml.safe_load(self.config_file.read_text()))

    def holds_train_config(self) -> bool:
        path = self.config_file
        if path.is_symlink() or not path.is_file():
            return False
        try:
            document = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(document, dict) and {"model", "data", "rank"} <= set(document)

    # ------------------------------------------------------------------------------------------
    # loss.png

    def plot(self) -> None:
        """loss.png: training loss per logged step, and eval loss where measured."""
        import matplotlib  # optional heavy backend: only a finished run draws

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.metrics()
        train_rows = [r for r in rows if "loss" in r]
        eval_rows = [r for r in rows if "eval" in r]
        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
        axis.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
        if eval_rows:
            axis.plot(
                [r["step"] for r in eval_rows],
                [r["eval"]["loss"] for r in eval_rows],
                "o-",
                label="eval loss",
            )
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(self.path / PLOT_FILE)
        plt.close(figure)


def _holds_only_events(path: Path) -> bool:
    """A directory of TensorBoard event files (what --report-to tensorboard writes) and nothing else."""
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return bool(entries) and all(
        p.is_file() and not p.is_symlink() and p.name.startswith("events.out.tfevents.") for p in entries
    )


def _logged_step(line: str) -> float:
    """The step of a metrics row; a blank or torn row (a run killed mid-append) counts as never logged."""
    try:
        row = loads_json(line)
    except ValueError:
        return math.inf
    step = row.get("step", 0) if isinstance(row, dict) else None
    return step if isinstance(step, int | float) else math.inf


# The functions of earlier versions, for callers that hold a path.


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    return RunDir(run_dir).checkpoint_dirs()


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    return RunDir(run_dir).latest_checkpoint()


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    return RunDir(run_dir).save_checkpoint(step, state, keep)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's state (JSON and safetensors only: nothing in a run directory can run code)."""
    return load_state(path)


def earlier_run(run_dir: str | Path) -> list[Path]:
    return RunDir(run_dir).earlier_run()


def plan_run_dir(config: TrainConfig) -> RunStart:
    return RunDir(config.out).plan(config)
