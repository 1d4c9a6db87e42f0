"""`train --report-to`: each tracker's store read back with the tool's own reader (TensorBoard's
EventAccumulator, MLflow's client on a file store, the records of a W&B offline run, trackio's SQLite
storage) against RUN/metrics.jsonl and config.yaml; a run that dies after its checkpoint and is resumed
continues the same tracker runs and sends no step twice. Nothing leaves the test's directory: W&B is
offline, MLflow's store is a `file:` directory, trackio's store is the session's (conftest: TRACKIO_DIR),
telemetry is off, and the W&B service process is stopped at the end."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.train import IDENTITY, TrainConfig, config_from_document, settings_document
from loraxs_cli.train import trackers as trackers_module
from loraxs_cli.train.run_dir import RunDir
from loraxs_cli.train.trackers import flat_settings, open_trackers

runner = CliRunner()
ALL = "tensorboard,mlflow,wandb,trackio"
ARITHMETIC = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(6) for b in range(4)]
TRAIN_KEYS = ("loss", "lr", "tokens_per_s", "epoch")


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """Every tracker writes under tmp_path, offline; the W&B service is gone afterwards."""
    psutil = pytest.importorskip("psutil")
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": tmp_path / "wandb",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
        "WANDB_CONSOLE": "off",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_CODE": "true",
        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps the file store behind this switch
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TRACKIO_PROJECT": f"loraxs-test-{tmp_path.name}",  # the session's store holds every test's
    }
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    (tmp_path / "wandb").mkdir()
    import trackio

    assert Path(os.environ["TRACKIO_DIR"]) == trackio.utils.TRACKIO_DIR  # conftest's, set before the import
    assert "loraxs-tests-" in str(trackio.utils.TRACKIO_DIR)
    yield tmp_path
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()  # the service process wandb.init started
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in children]
    assert not left, f"processes left behind: {left}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model: Path, data: Path, out: Path, *extra: str, report_to: str = ALL):
    args = [
        "train", model, "--data", data, "--out", out, "--rank", "4", "--batch-size", "4", "--max-length",
        "32", "--log-every", "1", "--eval-split", "0.25", "--eval-every", "2", "--report-to", report_to,
        *extra,
    ]  # fmt: skip
    return runner.invoke(app, [str(a) for a in args])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path) -> dict[str, dict[int, float]]:
    """{metric name: {step: value}} as each tracker should hold it, from RUN/metrics.jsonl."""
    found: dict[str, dict[int, float]] = {}
    for row in metrics(run):
        if "eval" in row:
            named = {f"eval/{k}": v for k, v in row["eval"].items() if isinstance(v, int | float)}
        elif row.get("kind") == "lr_find":
            named = {"lr_find/lr": row["lr_find"]["lr"]}
        else:
            named = {f"train/{k}": row[k] for k in TRAIN_KEYS}
        for name, value in named.items():
            found.setdefault(name, {})[row["step"]] = float(value)
    return found


# ----------------------------------------------------------------------------------------------
# Each store, read by its own tool: {metric name: [(step, value), ...]} in the order stored


def tensorboard_scalars(log_dir: Path) -> tuple[dict, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("config/text_summary")]
    return scalars, texts


def mlflow_run(run_id: str, names) -> tuple[object, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # MLFLOW_TRACKING_URI: the test's file store
    history = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)] for name in names}
    return client.get_run(run_id), history


def wandb_records(wandb_dir: Path, run_id: str) -> list:
    """The records of every offline run directory of `run_id`, in the order written.

    wandb (0.19 and later) has no Python reader of its `.wandb` files any more (the Go core writes them).
    The container is LevelDB's log format (https://github.com/google/leveldb/blob/main/doc/log_format.md:
    32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`, after a 7-byte `:W&B` header),
    and the records are wandb's own protobuf `Record`, parsed here by wandb's generated classes; each
    chunk's CRC-32 is checked, so a misread cannot pass unnoticed."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        position, pending = 7, b""
        while position + 7 <= len(data):
            left = 32768 - position % 32768
            crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if left < 7 or (crc, length, kind) == (0, 0, 0):  # the block's zero-filled trailer
                position += left
                continue
            chunk = data[position + 7 : position + 7 + length]
            assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad chunk at {position}"
            position += 7 + length
            pending += chunk
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(records) -> dict:
    history: dict[str, list] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            # A key with a slash is stored as its parts (`nested_key`), as W&B shows it: "train/loss".
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, []).append((items["_step"], value))
    return history


def wandb_config(records) -> dict:
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in runs[-1].config.update}


def trackio_logs(project: str, run_id: str) -> tuple[dict, dict]:
    from trackio.sqlite_storage import SQLiteStorage

    history: dict[str, list] = {}
    for entry in SQLiteStorage.get_logs(project, run_id=run_id):
        for name, value in entry.items():
            if name not in ("step", "timestamp"):
                history.setdefault(name, []).append((entry["step"], value))
    return history, SQLiteStorage.get_run_config(project, run_id=run_id)


def assert_same(history: dict, want: dict, tool: str, rel: float = 1e-12, skip: set = frozenset()) -> None:
    """The tracker holds exactly the metrics and steps of metrics.jsonl, each step once."""
    assert set(history) == set(want), f"{tool}: {sorted(set(history) ^ set(want))}"
    for name, steps in want.items():
        stored = dict(history[name])
        assert len(stored) == len(history[name]), f"{tool}: {name} logged a step twice: {history[name]}"
        assert sorted(stored) == sorted(steps), f"{tool}: {name} at steps {sorted(stored)}"
        for step, value in steps.items():
            if (name, step) not in skip:
                assert stored[step] == pytest.approx(value, rel=rel), f"{tool}: {name} at step {step}"


def read_all(run: Path, names) -> dict:
    """Each store's history (and its settings) for the runs RUN/trackers.json names."""
    state = json.loads((run / "trackers.json").read_text())
    tensorboard, texts = tensorboard_scalars(run / "tensorboard")
    mlflow_info, mlflow = mlflow_run(state["mlflow"]["run"]["run_id"], names)
    records = wandb_records(run.parent / "wandb", state["wandb"]["run"]["id"])
    trackio, trackio_config = trackio_logs(
        state["trackio"]["run"]["project"], state["trackio"]["run"]["run_id"]
    )
    return {
        "state": state,
        "tensorboard": tensorboard,
        "tensorboard_config": texts,
        "mlflow": mlflow,
        "mlflow_run": mlflow_info,
        "wandb": wandb_history(records),
        "wandb_records": records,
        "trackio": trackio,
        "trackio_config": trackio_config,
    }


# ----------------------------------------------------------------------------------------------


def test_one_run_reports_the_same_rows_and_settings_to_all_four(tiny_llama_dir, stores):
    data = write_jsonl(stores / "train.jsonl", ARITHMETIC)
    run = stores / "run"
    result = train(tiny_llama_dir, data, run, "--max-steps", "4", "--lr", "auto", "--lr-find-steps", "12",
                   "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the libraries' chatter went to stderr: stdout is the one document
    for name in ("tensorboard", "mlflow", "wandb", "trackio"):
        assert f"--report-to {name}: " in result.stderr
    want = expected(run)
    assert sorted(want["train/loss"]) == [1, 2, 3, 4] and sorted(want["eval/loss"]) == [2, 4]
    assert list(want["lr_find/lr"]) == [0]
    stored = read_all(run, list(want))
    document = yaml.safe_load((run / "config.yaml").read_text())

    # TensorBoard keeps float32 scalars; the settings are the text `config`, config.yaml's document.
    lr_find = {n for n in stored["tensorboard"] if n.startswith("lr_find/")} - {"lr_find/lr"}
    tensorboard = {k: v for k, v in stored["tensorboard"].items() if k not in lr_find}
    assert_same(tensorboard, want, "tensorboard", rel=1e-6)
    assert yaml.safe_load(stored["tensorboard_config"][0].strip("`\n").removeprefix("yaml\n")) == document

    # MLflow: float64 metrics, exact; every setting a parameter (text as is, the rest as JSON).
    assert_same(stored["mlflow"], want, "mlflow")
    info = stored["mlflow_run"]
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    assert info.data.params == flat_settings(document)
    assert info.data.params["rank"] == "4" and info.data.params["lr"] == "auto"
    assert info.data.params["recorded.factor_entry"] == document["recorded"]["factor_entry"]
    assert "lr_find/suggestions/valley" in info.data.metrics

    # W&B: one history row per step; its config is the document.
    assert_same({k: v for k, v in stored["wandb"].items() if k in want}, want, "wandb")
    config = wandb_config(stored["wandb_records"])
    assert {k: v for k, v in config.items() if k != "_wandb"} == document

    # trackio: the same rows; its config holds the document's settings.
    assert_same({k: v for k, v in stored["trackio"].items() if k in want}, want, "trackio")
    assert {k: stored["trackio_config"][k] for k in ("rank", "lr", "recorded")} == {
        k: document[k] for k in ("rank", "lr", "recorded")
    }


def test_a_resumed_run_continues_each_tracker_run_and_sends_no_step_twice(
    tiny_llama_dir, stores, monkeypatch
):
    data = write_jsonl(stores / "train.jsonl", ARITHMETIC)
    run = stores / "run"
    common = ("--max-steps", "6", "--save-every", "3")
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the process dies in step 5: steps 1-4 were sent, the checkpoint is step 3's
            raise RuntimeError("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    died = train(tiny_llama_dir, data, run, *common)
    assert died.exit_code != 0 and not (run / "adapter").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]
    first = json.loads((run / "trackers.json").read_text())
    assert first["tensorboard"]["sent"] == {"train": 4, "eval": 4}
    first_rows = {r["step"]: r for r in metrics(run) if "loss" in r}
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    # W&B names an offline run's directory by the second it started (offline-run-YYYYMMDD_HHMMSS-ID): a
    # resume within the same second would share the first start's directory. A second apart, as in use.
    time.sleep(1.1)

    resumed = train(tiny_llama_dir, data, run, *common, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 3
    assert "--report-to mlflow: continuing run" in resumed.stderr
    want = expected(run)
    assert sorted(want["train/loss"]) == [1, 2, 3, 4, 5, 6] and sorted(want["eval/loss"]) == [2, 4, 6]
    # Step 4 was trained twice, to the same values (exact resume); its tokens/s was the first attempt's.
    assert first_rows[4]["loss"] == pytest.approx(want["train/loss"][4], rel=1e-6)
    skip = {("train/tokens_per_s", 4)}
    stored = read_all(run, list(want))
    state = stored["state"]
    for name in ("tensorboard", "mlflow", "wandb", "trackio"):
        assert state[name]["run"] == first[name]["run"], f"{name}: not the same run"
        assert state[name]["sent"] == {"train": 6, "eval": 6}
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_same(stored["tensorboard"], want, "tensorboard", rel=1e-5, skip=skip)
    assert_same(stored["mlflow"], want, "mlflow", rel=1e-6, skip=skip)
    assert stored["mlflow_run"].info.status == "FINISHED"
    wandb_runs = list((stores / "wandb" / "wandb").glob(f"offline-run-*-{state['wandb']['run']['id']}"))
    assert len(wandb_runs) == 2  # one directory per start, one run id: `wandb sync` joins them
    assert_same({k: v for k, v in stored["wandb"].items() if k in want}, want, "wandb", rel=1e-6, skip=skip)
    assert_same(
        {k: v for k, v in stored["trackio"].items() if k in want}, want, "trackio", rel=1e-6, skip=skip
    )


def test_a_tracker_catches_up_on_the_rows_it_missed_and_force_removes_its_files(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path / "run")
    run.create()
    document = {"model": "m", "rank": 4}
    rows = [{"step": 1, "loss": 2.0}, {"step": 1, "eval": {"loss": 2.5}}, {"step": 2, "loss": 1.5}]
    with open_trackers(("tensorboard",), run.path, document, 0, rows):  # new: gets the rows already there
        pass
    with open_trackers(("tensorboard",), run.path, document, 2, rows) as trackers:  # continued: none again
        assert trackers.state["tensorboard"]["sent"] == {"train": 2, "eval": 1}
        trackers.log({"step": 2, "loss": 1.5})  # a step re-done after the checkpoint: not sent
        trackers.log({"step": 3, "loss": 1.0})
    scalars, texts = tensorboard_scalars(run.path / "tensorboard")
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5), (3, 1.0)] and scalars["eval/loss"] == [(1, 2.5)]
    assert len(texts) == 2
    (run.path / "config.yaml").write_text(yaml.safe_dump({"model": "m", "data": "d", "rank": 4}))
    assert {p.name for p in run.earlier_run()} == {"config.yaml", "trackers.json", "tensorboard"}


def test_report_to_is_checked_before_any_work_and_is_not_part_of_the_identity(
    tiny_llama_dir, tmp_path, monkeypatch
):
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    unknown = train(tiny_llama_dir, data, tmp_path / "a", report_to="tensorboard,comet")
    assert unknown.exit_code == 2 and "unknown --report-to 'comet'" in unknown.output
    monkeypatch.setitem(trackers_module.MODULES, "wandb", "no_such_module_for_loraxs_tests")
    missing = train(tiny_llama_dir, data, tmp_path / "b", report_to="wandb")
    assert missing.exit_code == 2, missing.output
    assert "--report-to wandb needs the wandb package: pip install 'loraxs[track]'" in missing.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "report_to" not in IDENTITY
    config = TrainConfig(model="m", data="d", out="o", report_to="mlflow,wandb")
    assert config_from_document(settings_document(config)).report_to == "mlflow,wandb"
    assert TrainConfig(model="m", data="d", out="o").report_to == "none"
    # trackio resumes by name: a new run takes one no run of its project has.
    runs = [SimpleNamespace(name="run"), SimpleNamespace(name="run-2")]
    assert trackers_module._free_name("run", runs) == "run-3"
    assert trackers_module._free_name("other", runs) == "other"
