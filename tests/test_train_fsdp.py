"""`train --distributed fsdp` (FSDP2, train/fsdp.py): two gloo processes on CPU with the base sharded
against one process with the same global batch (LoRA-SB's gradient pass on the sharded base, gradient
checkpointing, periodic evaluation), the base bytes each process holds, and an exact resume; the option,
its dry-run plan and its one-process fallback in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import ARITHMETIC, final_R, invoke, metrics, write_jsonl

from loraxs_cli.layer import inject
from loraxs_cli.models import backbone
from loraxs_cli.train import TrainConfig
from loraxs_cli.train.fsdp import MEMORY_REPORT_ENV, shard_rows
from loraxs_cli.train.setup import make_trainable
from models_for_tests import tiny_llama


def _torchrun(*args: str, cwd: Path, attempt: int) -> subprocess.CompletedProcess:
    port = str(29800 + os.getpid() % 500 + attempt)  # not test_train's ports: both may run at once
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", port, "-m", "loraxs_cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _report(directory: Path, rank: int) -> dict:
    return json.loads((directory / f"rank-{rank}.json").read_text())


def test_fsdp_two_processes_match_one_hold_half_the_base_and_resume(tiny_llama_dir, tmp_path, monkeypatch):
    """2 processes x batch 2 with the base sharded give one process x batch 4's R, losses and evaluations
    (LoRA-SB, so its gradient pass runs on the sharded base; 21 training rows make step 3, the last of
    the epoch, 5 examples: its second micro-batch holds one, and the process without one takes part with
    a zero loss weight); each process holds half the base; a run cut back to its step-2 checkpoint
    continues to the same R."""
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    common = [str(tiny_llama_dir), "--data", str(data), "--rank", "4", "--max-steps", "4",
              "--max-length", "32", "--lr", "1e-2", "--grad-accum", "2", "--log-every", "1",
              "--eval-split", "0.1", "--eval-every", "2", "--save-every", "2",
              "--method", "sb", "--sb-samples", "12", "--sb-batch-size", "1"]  # fmt: skip
    # The reference, in this process with one thread as the torchrun processes have; with batch 1 in the
    # gradient pass its mean gradient is the same whatever the split of the sample.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv(MEMORY_REPORT_ENV, str(tmp_path / "memory-one"))
    try:
        one = invoke("train", *common, "--batch-size", "4", "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output

    # Their own factor cache: LoRA-SB's factors are computed again, on the sharded base.
    monkeypatch.setenv("LORAXS_HOME", str(tmp_path / "home-fsdp"))
    monkeypatch.setenv(MEMORY_REPORT_ENV, str(tmp_path / "memory-fsdp"))
    run = tmp_path / "fsdp"
    args = ["train", *common, "--batch-size", "2", "--out", str(run), "--distributed", "fsdp",
            "--gradient-checkpointing"]  # fmt: skip
    two = _torchrun(*args, cwd=tmp_path, attempt=0)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "factor cache miss" in two.stderr
    a, b = final_R(tmp_path / "one"), final_R(run)
    assert a.keys() == b.keys() and len(a) == 14
    for key in a:  # the tolerance of test_train's DDP test
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    rows_one, rows_two = metrics(tmp_path / "one"), metrics(run)
    assert [r["loss"] for r in rows_one if "loss" in r] == pytest.approx(
        [r["loss"] for r in rows_two if "loss" in r], rel=1e-5
    )
    evals_one = [(r["step"], r["eval"]["loss"]) for r in rows_one if "eval" in r]
    evals_two = [(r["step"], r["eval"]["loss"]) for r in rows_two if "eval" in r]
    assert [s for s, _ in evals_two] == [2, 4]
    assert [v for _, v in evals_one] == pytest.approx([v for _, v in evals_two], rel=1e-5)
    assert "distributed: fsdp" in (run / "config.yaml").read_text()

    # Each process holds half of the base (the embedding's rows split in two); one DDP process, all of it.
    whole = _report(tmp_path / "memory-one", 0)
    assert whole["setup"]["mode"] == "ddp"
    assert whole["setup"]["base_bytes_local"] == whole["setup"]["base_bytes_full"]
    for rank in (0, 1):
        shard = _report(tmp_path / "memory-fsdp", rank)
        for stage in ("setup", "end"):  # "end": after the last evaluation, resharded again
            assert shard[stage]["mode"] == "fsdp"
            assert shard[stage]["base_bytes_full"] == whole["setup"]["base_bytes_full"]
            assert shard[stage]["base_bytes_local"] <= 0.6 * whole["setup"]["base_bytes_local"]

    # Resume: the run cut back to its step-2 checkpoint (as if killed after it) ends at the same R.
    uninterrupted = final_R(run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "adapter")
    again = _torchrun(*args, cwd=tmp_path, attempt=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "factor cache hit" in again.stderr
    resumed = final_R(run)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-6, atol=1e-9)


def test_distributed_option_plan_and_one_process_fallback(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ARITHMETIC)
    bad = invoke("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "bad", "--distributed", "zero")
    assert bad.exit_code == 2 and "--distributed" in bad.output
    # The plan under torchrun (WORLD_SIZE is all it reads): half the base per process, no step timed,
    # since timing one would load the whole base into every process.
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = invoke("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "plan", "--rank", "4",
                  "--distributed", "fsdp", "--dry-run", "--json")  # fmt: skip
    assert plan.exit_code == 0, plan.output
    doc = json.loads(plan.stdout)
    assert doc["distributed"] == "fsdp" and doc["processes"] == 2
    assert doc["weights_bytes_per_process"] == -(-doc["weights_bytes"] // 2)
    assert "not_measured" in doc and "estimate" not in doc
    # One process: nothing to shard; it says so and trains as one process.
    monkeypatch.delenv("WORLD_SIZE")
    alone = invoke("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "alone", "--rank", "4",
                   "--max-steps", "1", "--distributed", "fsdp")  # fmt: skip
    assert alone.exit_code == 0, alone.output
    assert "nothing to shard" in alone.output
    assert (tmp_path / "alone" / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("rows", [1, 5, 6, 49152])
def test_shard_rows_is_fsdp2s_dim0_split(rows):
    """The rows each process reads are the chunks torch.chunk (FSDP2's split) gives, empty ones too."""

    class Mesh:
        def __init__(self, rank: int, world: int):
            self.rank, self.world = rank, world

        def size(self) -> int:
            return self.world

        def get_local_rank(self) -> int:
            return self.rank

    for world in (2, 3, 4):
        chunks = torch.arange(rows).chunk(world)
        for rank in range(world):
            start, stop = shard_rows(rows, Mesh(rank, world))
            expected = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(start, stop)) == expected


def test_causal_lm_training_freezes_an_untied_output_layer():
    """An untied lm_head is outside the backbone: training a causal LM leaves it frozen (no gradient to
    compute, clip or reduce), R alone trains."""
    model = tiny_llama(vocab_size=64, tie_word_embeddings=False)
    core = backbone(model)
    target = "layers.0.self_attn.q_proj"
    inject(core, {target: (torch.randn(4, 64), torch.randn(64, 4))}, scaling=1.0)
    config = TrainConfig(model="m", data="d", out="o", task="causal-lm")
    assert make_trainable(model, config) == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"model.{target}.R"]
