"""`train --report-to`: the rows of RUN/metrics.jsonl and the run's settings, sent to experiment trackers,
each through its own library, from rank 0 only.

    Trackers            what the Trainer holds: `log(row)` for every row it appends to metrics.jsonl
    TensorBoardTracker  RUN/tensorboard, through torch.utils.tensorboard's SummaryWriter
    MLflowTracker       MlflowClient on MLflow's tracking URI (MLFLOW_TRACKING_URI, MLflow's default)
    WandbTracker        wandb.init, configured by wandb's own variables (WANDB_MODE, WANDB_PROJECT, WANDB_DIR)
    TrackioTracker      trackio.init: its local store (TRACKIO_DIR, default HF_HOME/trackio) or a Space

A row becomes metrics at its step: a training row as `train/loss`, `train/lr`, `train/tokens_per_s`,
`train/epoch`; an evaluation row as `eval/<name>`; the `--lr auto` row as `lr_find/<name>` (its numbers: the
chosen lr, each rule's suggestion, the test's settings; the curve itself stays in metrics.jsonl). The
settings are config.yaml's document (`RunDir.config_document`, the `recorded:` section included).

Resume: RUN/trackers.json (written atomically) holds each tracker's run (MLflow's run id and tracking URI,
the W&B run id and project, trackio's project, run name and id) and, per kind of row (train, eval,
lr_find), the last step sent to it. A resumed `train` continues those runs where they were started, and
sends a row only when its step is past the tracker's mark for that kind: the steps re-done after the
checkpoint (exact resume gives them the same values) are not sent twice. A tracker that has none of the
rows metrics.jsonl holds (one added on resume, or whose store is gone) gets them first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..errors import LoraxsError, UsageError
from ..fsutil import atomic_path, loads_json
from .config import IDENTITY
from .run_dir import TENSORBOARD_DIR, TRACKERS_FILE

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
EXTRA = "loraxs[track]"
# The module each tracker imports, and the package that provides it.
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio"}


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """The trackers of `--report-to` (comma-separated; `none` or empty: none), each checked to be known and
    importable (a usage error naming the pip extra otherwise), without importing any of them."""
    names = [part.strip().lower() for part in (value or "").split(",") if part.strip()]
    if names == ["none"]:
        return ()
    chosen: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise UsageError(
                f"unknown --report-to {name!r}: use a comma-separated subset of {', '.join(TRACKERS)}, "
                "or none"
            )
        if name not in chosen:
            chosen.append(name)
    for name in chosen:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise UsageError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install '{EXTRA}'")
    return tuple(chosen)


def row_metrics(row: Mapping) -> tuple[str, int, dict[str, float]]:
    """(kind, step, {name: value}) of a metrics.jsonl row: its numbers, named `<kind>/<key>` (nested keys
    joined by `/`); text, flags, lists (the --lr auto curve) and nulls are left out."""
    if "eval" in row:
        kind, values = "eval", row["eval"]
    elif isinstance(row.get("kind"), str):
        kind = row["kind"]
        values = row.get(kind) if isinstance(row.get(kind), Mapping) else {}
    else:
        kind, values = "train", {k: v for k, v in row.items() if k != "step"}
    return kind, int(row.get("step", 0)), dict(_numbers(values, f"{kind}/"))


def _numbers(values: Mapping, prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            yield f"{prefix}{key}", float(value)
        elif isinstance(value, Mapping):
            yield from _numbers(value, f"{prefix}{key}/")


def flat_settings(document: Mapping, prefix: str = "") -> dict[str, str]:
    """The settings document as flat text parameters (MLflow's): nested keys joined by `.`, a value that
    is not text as JSON (`null`, `true`, `[...]`)."""
    flat: dict[str, str] = {}
    for key, value in document.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return flat


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """The libraries print what they do (trackio: where it logs; W&B: its run summary): on stderr, so
    that stdout stays the one JSON document of `--json`."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ----------------------------------------------------------------------------------------------
# One class per tracker: start (or continue) its run, log metrics at a step, close it.


class Tracker:
    """The common interface. `start` opens the tracker's run, continuing `previous` (what an earlier
    start returned) where it can, sets `continued`, and returns what a later start needs to continue."""

    name = ""
    continued = False

    def start(self, run_dir: Path, document: dict, step: int, previous: dict | None) -> dict:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the run is, for the message `train` prints."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`); the settings as the text
    `config` at the step the run starts from. A resumed run adds a new event file to the same directory."""

    name = "tensorboard"

    def start(self, run_dir: Path, document: dict, step: int, previous: dict | None) -> dict:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / TENSORBOARD_DIR
        self.continued = previous is not None and any(self.log_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = yaml.safe_dump(document, sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```", global_step=step)
        self.writer.flush()
        return {"log_dir": str(self.log_dir)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it sent (the mark says it was sent)

    def close(self, status: str) -> None:
        self.writer.close()

    def where(self) -> str:
        return str(self.log_dir)


class MLflowTracker(Tracker):
    """A run in the experiment MLFLOW_EXPERIMENT_NAME (or MLFLOW_EXPERIMENT_ID; default: the run
    directory's name) of MLflow's tracking URI; the settings as parameters. MLflow parameters cannot
    change: a resumed run adds the new ones and keeps the first value of the others (config.yaml has
    the current ones). Its status at the end: FINISHED, FAILED, or KILLED (Ctrl-C, SIGTERM)."""

    name = "mlflow"

    def start(self, run_dir: Path, document: dict, step: int, previous: dict | None) -> dict:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        uri = previous["tracking_uri"] if previous else mlflow.get_tracking_uri()
        try:
            self.client = client = MlflowClient(uri)
            self.run_id = self._continue(previous) if previous else None
            self.continued = self.run_id is not None
            if self.run_id is None:
                experiment = self._experiment(run_dir.name)
                self.run_id = client.create_run(experiment, run_name=run_dir.name).info.run_id
        except Exception as error:  # an unusable store (MLflow's default sqlite without sqlalchemy, ...)
            raise UsageError(
                f"--report-to mlflow: cannot use the tracking store {uri} ({_first_line(error)}); set "
                "MLFLOW_TRACKING_URI to an MLflow server or a store this MLflow can open"
            ) from None
        self.uri = uri
        logged = client.get_run(self.run_id).data.params
        params = [
            Param(key, value[:MAX_PARAM_VAL_LENGTH])
            for key, value in flat_settings(document).items()
            if key not in logged
        ]
        for k in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=params[k : k + MAX_PARAMS_TAGS_PER_BATCH])
        return {"tracking_uri": uri, "run_id": self.run_id}

    def _continue(self, previous: dict) -> str | None:
        try:
            run = self.client.get_run(previous["run_id"])
        except Exception:  # not in this store (removed): a new run
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def _experiment(self, default: str) -> str:
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME

        if MLFLOW_EXPERIMENT_ID.get():
            return MLFLOW_EXPERIMENT_ID.get()
        name = MLFLOW_EXPERIMENT_NAME.get() or default
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status]
        self.client.set_terminated(self.run_id, status=mlflow_status)

    def where(self) -> str:
        return f"run {self.run_id} at {self.uri}"


class WandbTracker(Tracker):
    """A W&B run as wandb's variables configure it (WANDB_MODE=offline writes only WANDB_DIR; project
    WANDB_PROJECT, default the run directory's name; name WANDB_NAME, default the same); the settings as
    its config. A resumed run continues the same id (resume="allow"; offline, each start is a directory of
    its own that `wandb sync` joins into the one run)."""

    name = "wandb"

    def start(self, run_dir: Path, document: dict, step: int, previous: dict | None) -> dict:
        import wandb

        if previous:
            where = {"id": previous["id"], "project": previous["project"], "entity": previous.get("entity")}
        else:
            project = os.environ.get("WANDB_PROJECT") or run_dir.name
            where = {"project": project}  # wandb picks the id
        self.run = wandb.init(
            **where,
            name=os.environ.get("WANDB_NAME") or run_dir.name,
            config=document,
            allow_val_change=True,  # a resumed run's settings may differ outside the identity
            resume="allow",
            reinit="create_new",  # a run of its own, whatever else the process has open
        )
        self.continued = previous is not None
        return {"id": self.run.id, "project": self.run.project, "entity": self.run.entity or None}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 130}[status])

    def where(self) -> str:
        place = self.run.url or self.run.settings.sync_dir
        return f"run {self.run.id} in project {self.run.project} ({place})"


class TrackioTracker(Tracker):
    """A trackio run in project TRACKIO_PROJECT (default: the run directory's name), named after the run
    directory, in trackio's store (TRACKIO_DIR, default HF_HOME/trackio; a Space with TRACKIO_SPACE_ID);
    the settings as its config. trackio resumes a run by name (the latest of that name), so a new run
    takes a name no run of the project has (`NAME-2`, ... after the first), and a resumed one continues it
    (resume="allow")."""

    name = "trackio"

    def start(self, run_dir: Path, document: dict, step: int, previous: dict | None) -> dict:
        import trackio

        project = previous["project"] if previous else os.environ.get("TRACKIO_PROJECT") or run_dir.name
        name = previous["name"] if previous else _free_name(run_dir.name, _trackio_runs(project))
        self.run = trackio.init(
            project=project, name=name, config=document, resume="allow" if previous else "never", embed=False
        )
        self.continued = previous is not None and self.run.id == previous.get("run_id")
        self.store = trackio.utils.TRACKIO_DIR
        return {"project": project, "name": self.run.name, "run_id": self.run.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        from trackio import context_vars

        self.run.finish()
        if context_vars.current_run.get() is self.run:
            context_vars.current_run.set(None)

    def where(self) -> str:
        return f"run {self.run.name} in project {self.run.project} ({self.store})"


def _trackio_runs(project: str) -> list:
    import trackio

    try:
        return list(trackio.Api().runs(project))
    except ValueError:  # no such project yet
        return []


def _free_name(name: str, runs) -> str:
    taken = {run.name for run in runs}
    return next(n for n in (name, *(f"{name}-{k}" for k in range(2, len(taken) + 3))) if n not in taken)


CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# ----------------------------------------------------------------------------------------------
# The fan-out


class Trackers:
    """The trackers of a run, each with its high-water marks (the last step sent, per kind of row), saved
    in RUN/trackers.json after every row sent. A context manager: leaving it closes every tracker's run as
    finished, failed (an exception) or killed (Ctrl-C, SIGTERM)."""

    def __init__(self, state_file: Path | None = None, state: dict | None = None):
        self.state_file = state_file
        self.state = state or {}
        self.trackers: list[Tracker] = []

    def log(self, row: Mapping) -> None:
        """Send one metrics.jsonl row to every tracker that has not had its step of its kind yet."""
        if not self.trackers:
            return
        kind, step, metrics = row_metrics(row)
        sent = False
        with _stdout_to_stderr():
            for tracker in self.trackers:
                marks = self.state[tracker.name]["sent"]
                if step <= marks.get(kind, -1):
                    continue
                if metrics:
                    tracker.log(step, metrics)
                marks[kind] = step
                sent = True
        if sent:
            self.save()

    def save(self) -> None:
        # Also while Ctrl-C is being handled: the mark of a row sent must not be lost.
        with atomic_path(self.state_file, publish_interrupted=True) as tmp:
            Path(tmp).write_text(json.dumps(self.state, indent=1) + "\n")

    def close(self, status: str = "finished") -> None:
        """Close every tracker's run (all of them, even when one fails; the first failure is raised after,
        unless the run is failing already)."""
        failure = None
        with _stdout_to_stderr():
            for tracker in reversed(self.trackers):
                try:
                    tracker.close(status)
                except Exception as error:
                    failure = failure or error
        self.trackers = []
        if failure is not None and status == "finished":
            raise failure

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("killed" if issubclass(exc_type, KeyboardInterrupt) else "failed")


def open_trackers(
    names: tuple[str, ...],
    run_dir: Path,
    document: dict,
    step: int,
    rows: list[dict],
    message: Callable[[str], None] = lambda text: None,
) -> Trackers:
    """Start (or continue, from RUN/trackers.json) the run of each tracker in `names`, with the settings
    `document`, from `step` (the checkpoint's, 0 for a new run); then send each one the `rows` of
    metrics.jsonl it has not had."""
    if not names:
        return Trackers()
    state_file = Path(run_dir) / TRACKERS_FILE
    stored = read_state(state_file)
    identity = {key: document.get(key) for key in IDENTITY}
    if step == 0 and stored.get("identity") != json.loads(json.dumps(identity)):
        stored = {}  # an earlier attempt with other settings, killed before its first checkpoint
    trackers = Trackers(state_file, {**stored, "identity": identity})
    try:
        for name in names:
            tracker = CLASSES[name]()
            previous = stored.get(name)
            try:
                with _stdout_to_stderr():
                    handle = tracker.start(
                        Path(run_dir), document, step, previous.get("run") if previous else None
                    )
            except LoraxsError:
                raise
            except Exception as error:  # the library's own refusal (online W&B without a key, ...)
                raise UsageError(f"--report-to {name}: {_first_line(error)}") from None
            sent = previous.get("sent", {}) if previous and tracker.continued else {}
            trackers.state[name] = {"run": handle, "sent": dict(sent)}
            trackers.trackers.append(tracker)
            message(f"--report-to {name}: {'continuing ' if tracker.continued else ''}{tracker.where()}")
        trackers.save()
        for row in rows:
            trackers.log(row)
    except BaseException as error:
        trackers.close("killed" if isinstance(error, KeyboardInterrupt) else "failed")
        raise
    return trackers


def read_state(path: Path) -> dict:
    """RUN/trackers.json ({} when there is none or it cannot be read: the trackers then start new runs)."""
    try:
        state = loads_json(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
