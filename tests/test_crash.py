"""SIGKILL at chosen points of `init`, `train` and `merge`, and two processes on one factor cache.

Kills land by watching the file system (a temporary directory appears) or the child's progress lines,
never through hooks in the production code. Afterwards nothing partial passes as valid, `cache verify`
passes, and the next run recomputes or resumes to the result of an uninterrupted run. Only what is
killed or stopped is a process of its own; the runs after it (a process too, but not the one under test)
run in process. Kills land at a moment and processes race: the module runs on one xdist worker.
"""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hardening_util import Watched, run_cli, run_inprocess, sha256_tree, wait_for
from typer.testing import CliRunner

from loraxs_cli.adapter import load_adapter
from loraxs_cli.cache import FactorCache
from loraxs_cli.checkpoint import STATE_FILE, TENSORS_FILE
from loraxs_cli.cli.app import app
from loraxs_cli.train import checkpoint_dirs
from models_for_tests import make_adapter

pytestmark = pytest.mark.xdist_group("process")

ROWS = [{"prompt": f"{i} plus {i} is", "response": f" {2 * i}"} for i in range(8)]
SLOW_SVD = ["--niter", "2000"]  # about 1.5 s of SVD on the tiny model: a kill lands inside it
TRAIN_STEPS = 12


def entries(home: Path) -> list:
    return list(FactorCache(home / "factors").entries())


def verify(home: Path) -> dict:
    result = CliRunner().invoke(app, ["cache", "verify", "--json"], env={"LORAXS_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def temp_children(directory: Path, prefix: str) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def kill_when(child: Watched, predicate, what: str, timeout: float = 240) -> None:
    """SIGKILL the child as soon as predicate() holds; fail if it ended first (the point was missed)."""
    assert wait_for(lambda: predicate() or child.proc.poll() is not None, timeout), f"never reached {what}"
    assert child.proc.poll() is None, f"the process ended before {what}:\n{child.result().describe()}"
    child.kill()


def kill_inside(start, writing, written, undo, what: str, attempts: int = 6) -> None:
    """SIGKILL a child while `writing()` holds, for a write that happens once and may take only a few
    milliseconds. When the kill lands too late (`written()`: the write completed, or the child ended), the
    completed result must be valid (the caller's `undo` checks it, then removes it) and the point is
    tried again, so a fast machine cannot turn the test into a no-op."""
    for _ in range(attempts):
        child = start()
        assert wait_for(lambda c=child: writing() or c.proc.poll() is not None, 240), f"never reached {what}"
        if child.proc.poll() is None:
            child.kill()
        if not written():
            return
        undo()
    pytest.fail(f"{attempts} kills all landed after {what} had completed")


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crash-data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


# ----------------------------------------------------------------------------------------------
# init


def test_init_killed_in_svd_and_in_entry_write_then_recomputes(tmp_path, tiny_llama_dir):
    """Kill 1 holds the recipe's lock in the SVD; kill 2 (which must get past that stale lock) holds it
    while the entry is being written. Neither leaves an entry; the third run computes a valid one."""
    home = tmp_path / "home"
    args = ["init", tiny_llama_dir, "--rank", 4, *SLOW_SVD]
    in_svd = Watched(args, home)
    kill_when(in_svd, lambda: in_svd.saw("cache miss: computing"), "the SVD")
    assert list((home / "factors" / ".locks").glob("*.lock")), "the killed run held no lock"

    def base_dirs() -> list[Path]:
        return [p for p in (home / "factors").iterdir() if not p.name.startswith(".")]

    def undo() -> None:  # the entry was complete before the kill: it must verify, then go
        assert verify(home)["damaged"] == 0
        for entry in entries(home):
            shutil.rmtree(entry.path)

    kill_inside(
        lambda: Watched(args, home, env={"LORAXS_LOCK_TIMEOUT": "120"}),
        lambda: any(temp_children(b, ".tmp-") for b in base_dirs()),
        lambda: bool(entries(home)),
        undo,
        "the entry write",
    )
    assert entries(home) == []
    assert verify(home)["damaged"] == 0

    done = run_inprocess([*args, "--json"], home, env={"LORAXS_LOCK_TIMEOUT": "120"})
    assert done.returncode == 0, done.describe()
    assert json.loads(done.stdout)["cache"] == "miss"
    assert len(entries(home)) == 1
    report = verify(home)
    assert report["damaged"] == 0 and len(report["entries"]) == 1


# ----------------------------------------------------------------------------------------------
# train


def train_args(model: Path, data: Path, out: Path) -> list:
    return ["train", model, "--data", data, "--rank", 4, "--out", out, "--max-steps", TRAIN_STEPS,
            "--save-every", 1, "--keep-checkpoints", 2, "--batch-size", 2, "--lr", "2e-2", "--log-every", 1,
            "--json"]  # fmt: skip


def newest_step(run: Path) -> int:
    found = checkpoint_dirs(run)
    return int(found[-1].name.split("-")[1]) if found else 0


def test_train_killed_three_times_resumes_to_the_uninterrupted_result(tmp_path, tiny_llama_dir, train_data):
    home = tmp_path / "home"
    with pytest.MonkeyPatch.context() as patch:  # factors in the cache first: every run below is a hit
        patch.setenv("LORAXS_HOME", str(home))
        make_adapter(tiny_llama_dir, tmp_path / "warm-up")
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(run_cli, train_args(tiny_llama_dir, train_data, tmp_path / "ref"), home)
        run = tmp_path / "run"
        args = train_args(tiny_llama_dir, train_data, run)

        # kill 1: while a checkpoint is being written (its temporary directory exists)
        child = Watched(args, home)
        kill_when(child, lambda: bool(temp_children(run / "checkpoints", ".tmp-step-")), "a checkpoint write")
        # the partial one is not listed
        assert all((p / STATE_FILE).is_file() and (p / TENSORS_FILE).is_file() for p in checkpoint_dirs(run))
        # kill 2: between checkpoint writes, once the resumed run has written a new one
        start = newest_step(run)
        child = Watched(args, home)
        kill_when(child, lambda: newest_step(run) > start, "a new checkpoint")

        # kill 3: while the final adapter is being written (a resume from the last checkpoint rewrites it)
        def undo() -> None:
            load_adapter(run / "adapter")  # complete before the kill: it must load
            shutil.rmtree(run / "adapter")

        kill_inside(
            lambda: Watched(args, home),
            lambda: bool(temp_children(run, ".adapter.tmp-")),
            lambda: (run / "adapter").exists(),
            undo,
            "the adapter write",
        )
        assert not (run / "adapter").exists()

        final = run_inprocess(args, home)  # the resume from what the kills left
        expected = reference.result()
    assert final.returncode == 0, final.describe()
    assert expected.returncode == 0, expected.describe()
    assert not temp_children(run / "checkpoints", ".tmp-step-")  # the killed write's leftovers are gone
    assert json.loads(final.stdout)["resumed_from"] == TRAIN_STEPS  # the third kill came after the last step
    resumed, uninterrupted = load_adapter(run / "adapter"), load_adapter(tmp_path / "ref" / "adapter")
    assert resumed.R.keys() == uninterrupted.R.keys()
    for name, matrix in uninterrupted.R.items():
        assert not torch.equal(matrix, torch.zeros_like(matrix))
        torch.testing.assert_close(resumed.R[name], matrix, rtol=1e-5, atol=1e-6)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in logged if isinstance(s, int)] == list(range(1, TRAIN_STEPS + 1))
    assert verify(home)["damaged"] == 0


# ----------------------------------------------------------------------------------------------
# merge


def test_merge_killed_mid_write_keeps_the_old_output_and_reruns(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    runner = CliRunner(env={"LORAXS_HOME": str(home)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(home))
        adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    done = runner.invoke(app, ["merge", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(merged)])
    assert done.exit_code == 0, done.output
    before = sha256_tree(merged)

    args = ["merge", tiny_llama_dir, "--adapter", adapter, "--out", merged, "--force"]
    killed: list[Watched] = []

    def start() -> Watched:
        killed.append(Watched(args, home))
        return killed[-1]

    def finished() -> bool:  # the merge got to its end before the kill landed
        return killed[-1].proc.wait() == 0

    def undo() -> None:  # the same inputs give the same bytes
        assert sha256_tree(merged) == before

    writing = lambda: bool(temp_children(tmp_path, ".merged.tmp-"))  # noqa: E731
    kill_inside(start, writing, finished, undo, "the merge write")
    assert sha256_tree(merged) == before

    again = tmp_path / "again"
    done = runner.invoke(app, ["merge", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(again)])
    assert done.exit_code == 0, done.output
    shard = "model.safetensors"
    assert sha256_tree(again / shard)[str(again / shard)] == before[str(merged / shard)]


# ----------------------------------------------------------------------------------------------
# two processes, one cache


def lock_files(home: Path) -> list[Path]:
    return sorted((home / "factors" / ".locks").glob("*--*--*.lock"))


def test_same_recipe_is_computed_once_the_second_process_waits_and_hits(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    args = ["-v", "init", tiny_llama_dir, "--rank", 4, *SLOW_SVD, "--json"]
    first = Watched(args, home)
    assert wait_for(lambda: first.saw("cache miss: computing") or first.proc.poll() is not None, 240)
    first.proc.send_signal(signal.SIGSTOP)  # holds the recipe's lock, mid-SVD
    try:
        second = Watched(args, home)
        assert wait_for(lambda: second.saw("resolving") or second.proc.poll() is not None, 240)
        # Still running and idle while the first is stopped: it can only be waiting on the lock.
        assert second.idle(), second.result().describe()
        assert entries(home) == []
    finally:
        first.proc.send_signal(signal.SIGCONT)
    one, two = first.result(), second.result()
    assert one.returncode == 0 and two.returncode == 0, one.describe() + two.describe()
    assert json.loads(one.stdout)["cache"] == "miss"
    assert json.loads(two.stdout)["cache"] == "hit"
    assert "cache miss: computing" not in two.stderr
    assert len(entries(home)) == 1 and verify(home)["damaged"] == 0


def test_different_recipes_do_not_wait_for_each_other(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    first = Watched(["init", tiny_llama_dir, "--rank", 4, *SLOW_SVD, "--json"], home)
    assert wait_for(lambda: first.saw("cache miss: computing") or first.proc.poll() is not None, 240)
    first.proc.send_signal(signal.SIGSTOP)
    try:
        # another recipe; a wait on the stopped run's lock would end in 120 s (exit 3), not hang
        args = ["init", tiny_llama_dir, "--rank", 4, "--seed", 7, "--json"]
        other = run_inprocess(args, home, env={"LORAXS_LOCK_TIMEOUT": "120"})
        assert other.returncode == 0, other.describe()
        assert json.loads(other.stdout)["cache"] == "miss"
        assert first.proc.poll() is None  # finished while the first still held its own lock
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert first.result().returncode == 0
    assert len(entries(home)) == 2 and len(lock_files(home)) == 2
    assert verify(home)["damaged"] == 0


def test_resume_drops_a_metrics_row_torn_by_a_kill(tmp_path):
    """A kill in the middle of appending to metrics.jsonl leaves half a row; resuming must not choke on it."""
    from loraxs_cli.train import RunDir

    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    RunDir(tmp_path).trim_metrics(2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == rows[:2]
