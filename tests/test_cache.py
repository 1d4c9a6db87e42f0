"""The factor cache: hits compute nothing, larger entries serve smaller ranks, atomic writes under a lock,
one computation for two concurrent processes, and `loraxs cache ls | rm | verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from filelock import FileLock, Timeout
from typer.testing import CliRunner

from loraxs_cli import factors as factors_module
from loraxs_cli.cache import FACTORS_FILE, FactorCache
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError
from loraxs_cli.factors import SVDSettings
from loraxs_cli.initialize import FactorRequest, ensure_factors, plan_factors
from loraxs_cli.methods import xs as xs_method

runner = CliRunner()


def init_cli(*args: str):
    return runner.invoke(app, ["init", *args, "--json"])


@pytest.fixture
def svd_calls(monkeypatch) -> list[str]:
    """Counts every truncated SVD the factor code runs."""
    calls: list[str] = []
    real = factors_module.truncated_svd

    def counting(matrix, rank, settings, name=""):
        calls.append(name)
        return real(matrix, rank, settings, name)

    monkeypatch.setattr(factors_module, "truncated_svd", counting)
    return calls


def flip_one_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data, after the header
    path.write_bytes(bytes(data))


def test_second_identical_init_is_a_hit_without_svd_or_weight_loading(tiny_llama_dir, svd_calls, monkeypatch):
    first = init_cli(str(tiny_llama_dir), "-r", "4")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["cache"] == "miss" and len(svd_calls) == 14 == len(doc["modules"])

    def no_loading(*args, **kwargs):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(xs_method, "load_model", no_loading)  # where LoRA-XS's compute loads the base
    second = init_cli(str(tiny_llama_dir), "-r", "4")
    assert second.exit_code == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["cache"] == "hit" and len(svd_calls) == 14
    assert again["entry"] == doc["entry"] and again["sha256"] == doc["sha256"]
    assert [m["energy"] for m in again["modules"]] == [m["energy"] for m in doc["modules"]]


def test_smaller_rank_and_module_subset_are_served_from_a_larger_entry(tiny_llama_dir, svd_calls):
    big = json.loads(init_cli(str(tiny_llama_dir), "-r", "8").stdout)
    assert len(svd_calls) == 14
    small = init_cli(str(tiny_llama_dir), "-r", "3", "--targets", "q_proj,v_proj")
    assert small.exit_code == 0, small.stderr
    doc = json.loads(small.stdout)
    assert doc["cache"] == "hit" and doc["entry"] == big["entry"] and doc["r_max"] == 8
    assert len(svd_calls) == 14, "no SVD for a smaller rank"
    assert [m["name"] for m in doc["modules"]] == [
        f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    entry = FactorCache().get(big["entry"])
    r3 = entry.load(3, ["layers.0.self_attn.q_proj"])["layers.0.self_attn.q_proj"]
    r8 = entry.load(8, ["layers.0.self_attn.q_proj"])["layers.0.self_attn.q_proj"]
    assert r3["A"].shape == (3, 64) and r3["B"].shape == (64, 3)
    assert torch.equal(r3["A"], r8["A"][:3]) and torch.equal(r3["B"], r8["B"][:, :3])
    # A larger rank is a new entry; the old one stays (adapters trained on it keep working).
    bigger = json.loads(init_cli(str(tiny_llama_dir), "-r", "12").stdout)
    assert bigger["cache"] == "miss" and bigger["entry"] != big["entry"]
    assert len(list(FactorCache().entries())) == 2


def test_another_recipe_is_another_entry(tiny_llama_dir, svd_calls):
    a = json.loads(init_cli(str(tiny_llama_dir), "-r", "4").stdout)
    b = json.loads(init_cli(str(tiny_llama_dir), "-r", "4", "--niter", "2").stdout)
    assert a["cache"] == b["cache"] == "miss" and a["entry"] != b["entry"]
    meta = FactorCache().get(b["entry"]).meta
    assert meta["recipe"]["svd"] == {"backend": "torch", "niter": 2, "oversample": 16, "seed": 0}
    assert meta["base"]["fingerprint"] == b["fingerprint"] and meta["r_max"] == 4


def test_write_is_atomic_and_under_the_lock(tiny_llama_dir, loraxs_home):
    plan = plan_factors(FactorRequest(str(tiny_llama_dir), rank=2, svd=SVDSettings(niter=0)))
    lock_file = (
        loraxs_home
        / "factors"
        / ".locks"
        / f"{plan.base.slug}--{plan.base.fingerprint}--{plan.recipe.hash}.lock"
    )
    seen = {}

    def failing_compute(plan_, on_module):
        seen["lock_exists"] = lock_file.exists()
        try:
            FileLock(str(lock_file), timeout=0).acquire()
            seen["held"] = False
        except Timeout:
            seen["held"] = True
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        ensure_factors(plan, compute=failing_compute)
    assert seen == {"lock_exists": True, "held": True}
    base_dir = FactorCache().base_dir(plan.base.slug, plan.base.fingerprint)
    assert not base_dir.exists() or list(base_dir.iterdir()) == []

    # A failure while writing the file leaves no entry and no temporary directory behind.
    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import loraxs_cli.cache as cache_module

    with pytest.MonkeyPatch.context() as patch:  # the cache writes with safetensors' save_file
        patch.setattr(cache_module, "save_file", broken_save)
        with pytest.raises(BadInputError, match=r"cannot write to the factor cache.*No space left"):
            ensure_factors(plan)
    assert list(FactorCache().entries()) == []
    assert [p.name for p in base_dir.iterdir()] == []

    # A temporary directory left by a killed writer is never listed, and `verify` cleans old ones.
    entry, hit = ensure_factors(plan)
    assert not hit and entry.verify() is None
    stale = base_dir / ".tmp-xs-r2-dead-1234-abcd"
    stale.mkdir()
    (stale / FACTORS_FILE).write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert [e.id for e in FactorCache().entries()] == [entry.id]
    result = runner.invoke(app, ["cache", "verify", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["stale_temps_removed"] == 1 and not stale.exists()


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import loraxs_cli.initialize as initialize

    count_file, barrier, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    real = initialize._compute_xs

    def slow_compute(plan, on_module):
        with open(count_file, "a") as handle:
            handle.write("computed\\n")
        time.sleep(2)  # the other process is now waiting on the lock
        return real(plan, on_module)

    initialize._compute_xs = slow_compute
    (barrier / str(__import__("os").getpid())).touch()
    while len(list(barrier.iterdir())) < 2:  # start both at once, after their slow imports
        time.sleep(0.05)
    from loraxs_cli.cli.app import app
    app(args=args, prog_name="loraxs")
    """
)


def test_two_processes_compute_the_same_entry_once(tmp_path, tiny_llama_dir):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    count_file, barrier = tmp_path / "computed.txt", tmp_path / "barrier"
    barrier.mkdir()
    command = [sys.executable, str(script), str(count_file), str(barrier)]
    args = ["init", str(tiny_llama_dir), "-r", "4", "--json"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen(command + args, **pipes) for _ in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    docs = [json.loads(out) for out, _ in outputs]
    assert count_file.read_text().splitlines() == ["computed"]
    assert sorted(d["cache"] for d in docs) == ["hit", "miss"]
    assert docs[0]["entry"] == docs[1]["entry"] and docs[0]["sha256"] == docs[1]["sha256"]
    assert len(list(FactorCache().entries())) == 1


def test_cache_ls_rm_verify(tiny_llama_dir, tiny_gpt2_dir):
    llama = json.loads(init_cli(str(tiny_llama_dir), "-r", "4").stdout)
    gpt2 = json.loads(init_cli(str(tiny_gpt2_dir), "-r", "2").stdout)

    listing = runner.invoke(app, ["cache", "ls", "--json"])
    assert listing.exit_code == 0, listing.stderr
    doc = json.loads(listing.stdout)
    rows = {r["id"]: r for r in doc["entries"]}
    assert set(rows) == {llama["entry"], gpt2["entry"]}
    row = rows[llama["entry"]]
    assert row["base"] == tiny_llama_dir.name and row["method"] == "xs" and row["r_max"] == 4
    assert row["modules"] == 14 and row["fingerprint"] == llama["fingerprint"]
    assert row["svd"]["backend"] == "torch" and row["bytes"] > 14 * 4 * (64 + 64) * 4 // 2
    assert doc["bytes"] == sum(r["bytes"] for r in doc["entries"])
    assert time.strptime(row["last_used"], "%Y-%m-%d %H:%M")

    table = runner.invoke(app, ["cache", "ls"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and llama["entry"] in table.stdout and "2 entries" in table.stdout

    ok = runner.invoke(app, ["cache", "verify"])
    assert ok.exit_code == 0 and "2 entries checked, 0 damaged" in ok.stdout

    flip_one_bit(FactorCache().get(gpt2["entry"]).file)
    bad = runner.invoke(app, ["cache", "verify", "--json"])
    assert bad.exit_code == 3
    result = {r["id"]: r["problem"] for r in json.loads(bad.stdout)["entries"]}
    assert result[llama["entry"]] is None and "sha256 mismatch" in result[gpt2["entry"]]

    # Using the damaged entry is refused with a one-line fix, not a traceback.
    use = init_cli(str(tiny_gpt2_dir), "-r", "2")
    assert use.exit_code == 3
    assert use.stderr.count("\n") == 1 and f"loraxs cache rm {gpt2['entry']}" in use.stderr

    missing = runner.invoke(app, ["cache", "rm", "nope/nothing", "--yes"])
    assert missing.exit_code == 3 and "no cache entry or base 'nope/nothing'" in missing.stderr
    removed = runner.invoke(app, ["cache", "rm", gpt2["entry"], "--yes", "--json"])
    assert removed.exit_code == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == [gpt2["entry"]]
    assert [e.id for e in FactorCache().entries()] == [llama["entry"]]
    assert not (FactorCache().root / gpt2["entry"].split("/")[0]).exists()  # empty base dir removed
    declined = runner.invoke(app, ["cache", "rm", llama["entry"]], input="n\n")
    assert declined.exit_code == 0 and FactorCache().get(llama["entry"]) is not None
    assert declined.stderr.rstrip().endswith("cancelled: nothing removed"), declined.stderr
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 0
