"""`init --method xs` reads each target weight straight from the checkpoint (loraxs_cli/weights.py): the
same bits as the factors of a loaded model, a peak of a few weights, and a dry-run plan of that peak
(also from a built-in preset's shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.estimate import PRESETS, find_preset, preset_names
from loraxs_cli.factors import SVDSettings, compute_xs_factors
from loraxs_cli.initialize import FactorRequest, plan_factors
from loraxs_cli.methods import xs as xs_module
from loraxs_cli.methods.xs import XS
from loraxs_cli.models import backbone, load_model, parse_targets
from loraxs_cli.weights import GGUFWeightReader, SafetensorsReader, one_ahead, open_weights
from models_for_tests import tiny_gpt2, tiny_llama, tiny_llama_gguf

runner = CliRunner()
RANK = 4


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of each kind the reader handles, written once for the module."""
    root = tmp_path_factory.mktemp("stream-checkpoints")
    shape = dict(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2)
    tiny_llama(**shape).save_pretrained(root / "sharded", max_shard_size="60KB")  # ~9 shards + index
    tiny_llama(seed=1, **shape).to(torch.bfloat16).save_pretrained(root / "bf16")
    tiny_gpt2(vocab_size=256).save_pretrained(root / "gpt2")
    tiny_llama_gguf(root / "tiny.gguf", vocab_size=1024)
    bin_only = root / "bin-only"  # no safetensors: read by loading the model
    model = tiny_llama(seed=2, **shape)
    model.config.save_pretrained(bin_only)
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    return {p.name: p for p in root.iterdir()}


CASES = {
    # name: (checkpoint, --dtype, SVD backend, reader)
    "sharded-llama": ("sharded", None, "torch", SafetensorsReader),
    "fp32-read-as-bf16": ("sharded", "bf16", "torch", SafetensorsReader),
    "bf16-read-as-fp32": ("bf16", "fp32", "exact", SafetensorsReader),
    "bf16-as-stored": ("bf16", None, "torch", SafetensorsReader),
    "gpt2-conv1d": ("gpt2", None, "torch", SafetensorsReader),
    "gpt2-conv1d-sklearn": ("gpt2", "fp16", "sklearn", SafetensorsReader),
    "gguf": ("tiny.gguf", None, "torch", GGUFWeightReader),
    "gguf-as-bf16": ("tiny.gguf", "bf16", "torch", GGUFWeightReader),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_factors_are_the_bits_of_a_loaded_model(case, checkpoints, monkeypatch):
    name, dtype, backend, reader_class = CASES[case]
    request = FactorRequest(
        model=str(checkpoints[name]),
        rank=RANK,
        targets=parse_targets("all-linear"),
        dtype=dtype,
        svd=SVDSettings.for_backend(backend, niter=2 if backend != "exact" else None),
    )
    plan = plan_factors(request)
    base = plan.base
    assert len(plan.targets) >= 8
    reader = open_weights(base.resolved, base.config, base.modules, plan.targets, base.weights_dtype)
    assert type(reader) is reader_class  # streamed, not the fallback

    def no_load(*args, **kwargs):
        raise AssertionError("the streamed compute loaded the model")

    with monkeypatch.context() as patch:
        patch.setattr(xs_module, "load_model", no_load)
        tensors, meta = XS.compute(plan)
    model = load_model(base.resolved, head="base", dtype=base.weights_dtype)
    reference = compute_xs_factors(backbone(model), plan.targets, RANK, request.svd)
    assert list(tensors) == list(reference.tensors)
    for key, value in reference.tensors.items():
        assert tensors[key].dtype == value.dtype == torch.float32
        assert torch.equal(tensors[key], value), key
    assert meta == {"stats": reference.stats}  # the entry's meta: same keys, same numbers
    first = meta["stats"][plan.targets[0]]
    assert set(first) == {"shape", "frobenius_sq", "singular_values"}


def test_a_hub_cache_snapshot_streams_through_its_symlinks(checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from test_models import hub_snapshot

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    hub_snapshot(tmp_path / "hf", checkpoints["sharded"], repo_id="org/sharded")
    hub = plan_factors(FactorRequest(model="org/sharded", rank=RANK))
    local = plan_factors(FactorRequest(model=str(checkpoints["sharded"]), rank=RANK))
    assert hub.base.resolved.kind == "hub"
    base = hub.base
    reader = open_weights(base.resolved, base.config, base.modules, hub.targets, base.weights_dtype)
    assert type(reader) is SafetensorsReader and all(p.is_symlink() for p in reader.files.values())
    streamed, _ = XS.compute(hub)
    expected, _ = XS.compute(local)
    assert all(torch.equal(streamed[k], v) for k, v in expected.items())


def test_a_bin_only_checkpoint_is_loaded_instead(checkpoints):
    plan = plan_factors(FactorRequest(model=str(checkpoints["bin-only"]), rank=RANK))
    tensors, _ = XS.compute(plan)
    model = load_model(plan.base.resolved, head="base", dtype=plan.base.weights_dtype)
    reference = compute_xs_factors(backbone(model), plan.targets, RANK, plan.request.svd)
    assert all(torch.equal(tensors[k], v) for k, v in reference.tensors.items())
    doc = dry_run(checkpoints["bin-only"])
    assert doc["streamed"] is False and doc["planned_peak_bytes"] > doc["base_params"] * 4


def test_the_cli_entry_is_the_same_either_way(checkpoints, monkeypatch):
    """`loraxs init` on a sharded checkpoint streams; recomputing through a loaded model (the fallback)
    writes an entry with the same tensors file (sha256) and the same meta but for the time taken."""
    args = ("init", checkpoints["sharded"], "-r", RANK, "--json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    streamed = json.loads(first.stdout)

    def refuse(*args, **kwargs):
        raise xs_module.NotStreamable("test: load instead")

    monkeypatch.setattr(xs_module, "open_weights", refuse)
    second = invoke(*args, "--force")
    assert second.exit_code == 0, second.output
    loaded = json.loads(second.stdout)
    assert streamed["sha256"] == loaded["sha256"] and streamed["modules"] == loaded["modules"]


def test_one_ahead_holds_at_most_the_next_item():
    produced, alive, peak = [], set(), [0]
    lock = threading.Lock()

    class Item:
        def __init__(self, i):
            self.i = i
            with lock:
                alive.add(i)
                peak[0] = max(peak[0], len(alive))

        def __del__(self):
            with lock:
                alive.discard(self.i)

    def items():
        for i in range(6):
            produced.append(i)
            yield Item(i)

    seen = []
    for item in one_ahead(items()):
        assert max(produced) <= item.i + 1  # never more than one ahead
        seen.append(item.i)
        del item
    assert seen == list(range(6)) and peak[0] <= 2

    def failing():
        yield Item(0)
        raise ValueError("unreadable shard")

    with pytest.raises(ValueError, match="unreadable shard"):
        list(one_ahead(failing()))


# ----------------------------------------------------------------------------- peak memory

PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import psutil
from loraxs_cli.initialize import FactorRequest, ensure_factors, plan_factors
from loraxs_cli.methods import XS
from loraxs_cli import weights  # noqa: F401 - imported before the measurement, as init imports it

def high_water_mark():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

plan = plan_factors(FactorRequest(model=sys.argv[1], rank=8, targets=["all-linear"]))
fields = XS.plan_fields(plan, None)
import torch
from loraxs_cli.factors import xs_factor_pair
xs_factor_pair(torch.randn(512, 256), 8, plan.request.svd, "warm-up")  # BLAS/LAPACK's own buffers: baseline
Path("/proc/self/clear_refs").write_text("5")  # reset the peak: measure the compute alone
before = psutil.Process().memory_info().rss
entry, hit = ensure_factors(plan)
assert not hit
print(json.dumps({"before": before, "peak": high_water_mark(), "planned": fields["planned_peak_bytes"],
                  "streamed": fields["streamed"], "modules": len(plan.targets)}))
"""


@pytest.fixture(scope="module")
def large_sharded_llama(tmp_path_factory) -> Path:
    """A ~105 MB float32 Llama in ~10 MB shards; its largest weight (1536 x 512) is 3 MiB."""
    directory = tmp_path_factory.mktemp("stream-large")
    tiny_llama(
        vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128,
    ).save_pretrained(directory, max_shard_size="10MB")  # fmt: skip
    return directory


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
def test_init_peak_memory_is_a_few_weights(large_sharded_llama):
    """In a fresh process: the peak RSS the compute adds is within the dry run's plan (a few copies of
    the largest weight + the factors), far below the checkpoint a load would hold."""
    # glibc keeps a freed block below its dynamic mmap threshold (which rises to the size of freed blocks,
    # up to 32 MiB) in the heap, in amounts that vary from run to run (the heap's layout): ~5-15 MiB with
    # these 3 MiB weights. A 7B model's weights are all above 32 MiB, so they are unmapped when freed;
    # a fixed 1 MiB threshold gives these small weights the same treatment, and the test measures the
    # algorithm's memory rather than the heap's layout.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(large_sharded_llama)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    checkpoint = sum(p.stat().st_size for p in large_sharded_llama.glob("*.safetensors"))
    added = figures["peak"] - figures["before"]
    sizes = {"added": added, "checkpoint": checkpoint, **{k: figures[k] for k in ("before", "planned")}}
    mib = {k: f"{v / 2**20:.1f} MiB" for k, v in sizes.items()}
    print(
        f"\ninit peak RSS: +{mib['added']} over {mib['before']} baseline; planned {mib['planned']}; "
        f"checkpoint {mib['checkpoint']}, {figures['modules']} targets"
    )
    assert figures["streamed"] and figures["modules"] == 8 * 7
    largest = 1536 * 512 * 4
    assert figures["planned"] < 6 * largest  # 4 float32 copies of it + the factors (~2.4 MiB)
    # + 8 MiB: Python objects (the stats, the skeleton the reader builds) and the reading thread.
    assert added < min(0.5 * checkpoint, figures["planned"] + 8 * 2**20)


# ----------------------------------------------------------------------------- --dry-run plans


def dry_run(model, *extra, rank: int = RANK) -> dict:
    result = invoke("init", model, "-r", rank, "--dry-run", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_dry_run_plans_the_peak_from_the_shapes(checkpoints):
    doc = dry_run(checkpoints["sharded"])
    assert doc["streamed"] is True and doc["largest_target"] == [160, 96]
    # read-ahead float32 copy + its cast (float32 checkpoint: 4 + 4), float32 work (4), ||W||^2 temporary (4)
    assert doc["planned_peak_bytes"] == 160 * 96 * 16 + doc["factor_bytes"]
    bf16 = dry_run(checkpoints["sharded"], "--dtype", "bf16")  # stored 4 + cast 2 + 4 + 4
    assert bf16["planned_peak_bytes"] == 160 * 96 * 14 + bf16["factor_bytes"]
    text = invoke("init", checkpoints["sharded"], "-r", RANK, "--dry-run")
    assert text.exit_code == 0 and "peak beyond the libraries" in text.stdout, text.stdout
    assert "one weight at a time" in text.stdout


def test_dry_run_accepts_every_builtin_preset():
    doc = dry_run("mistral-7b", rank=64)
    preset = PRESETS["mistral-7b"]
    shapes = preset.shapes()
    assert doc["preset"] == preset.name and doc["cache"] == "none" and doc["fingerprint"] is None
    assert doc["modules"] == len(shapes) == 32 * 7 and doc["rank"] == 64
    assert doc["base_params"] == preset.total_params and doc["base_dtype"] == "bfloat16"
    assert doc["factor_bytes"] == sum(64 * (s.out_features + s.in_features) * 4 for s in shapes)
    assert doc["largest_target"] == [14336, 4096]  # bf16 read-ahead (2 + 2) + 4 + 4
    assert doc["planned_peak_bytes"] == 14336 * 4096 * 12 + doc["factor_bytes"]
    assert doc["planned_peak_bytes"] < 2 * 2**30 - 512 * 2**20  # the 7B init fits in 2 GiB with the libraries
    text = invoke("init", "mistral-7b", "-r", "64", "--dry-run")
    assert text.exit_code == 0 and "built-in preset" in text.stdout and "peak" in text.stdout, text.stdout
    for name in preset_names():
        plan = dry_run(name, "-t", "all-linear")
        assert plan["preset"] == find_preset(name).name and plan["planned_peak_bytes"] > plan["factor_bytes"]
        assert plan["base_dtype"] == ("float32" if name.startswith("roberta") else "bfloat16")


def test_init_on_a_preset_name_without_dry_run_is_one_usage_line():
    result = invoke("init", "mistral-7b", "-r", "64")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "built-in preset" in result.stderr, result.stderr
    assert "--dry-run" in result.stderr
    unknown = invoke("init", "mistral-7c", "-r", "64", "--dry-run")
    assert unknown.exit_code == 3 and unknown.stderr.count("\n") == 1, unknown.stderr


def test_the_benchmark_runs_in_its_quick_mode():
    """benchmarks/bench_init_stream.py end to end on tiny shapes (its figures: shape and sign only)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_init_stream.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--skip-load"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["layers"] == 2 and doc["modules"] == 2 * 7 and doc["shards"] == 3
    init = doc["init"]
    assert init["peak_rss"] >= doc["imports_baseline_rss"] > 0 and init["planned_peak_bytes"] > 0
    assert init["seconds"] > init["compute_seconds"] > 0
    assert init["extrapolated_compute_seconds_32_layers"] == pytest.approx(16 * init["compute_seconds"])
    assert "transformers_load" not in doc
