"""Streaming `loraxs init` against loading the same model with transformers, on a Mistral-7B-shaped base.

Writes a random Mistral-7B-shaped checkpoint in bfloat16 (32 layers, hidden 4096, intermediate 14336,
8 key/value heads, vocabulary 32000: ~14.5 GB at 32 layers) into a temporary directory, then runs, each
in a fresh subprocess:

- `loraxs init DIR --rank 64 --json` (its own LORAXS_HOME, so the fingerprint is computed and the
  factors are a cache miss), which reads one weight at a time from the checkpoint;
- `AutoModelForCausalLM.from_pretrained(DIR, dtype="auto")`, what loading the base costs by itself,
  followed by one read of every parameter (transformers maps the file lazily: the SVD of a loaded model
  reads every target, and the peak of that read is the loaded model's memory);

and prints, as JSON, the peak RSS (the VmHWM each child reports at exit) and wall time of each, their
ratios, the dry run's planned peak, the SVD time per matrix and, for fewer layers than 32, the
extrapolation to the whole model.

The checkpoint is written shard by shard (`--layers-per-shard` layers in each, ~0.9 GB at the default
2; embeddings and head in shards of their own) with a `model.safetensors.index.json`, so writing never
holds more than one shard: safetensors' save_file needs a shard's tensors in memory at once, and the
real Mistral's two ~10 GB / ~4.5 GB shards would need 10 GB for that. Reading is the same either way:
`init` opens the shard of each tensor for that tensor only.

    python benchmarks/bench_init_stream.py [--layers 32] [--rank 64] [--device cpu] [--dir PATH] [--keep]

`--dir PATH` writes the checkpoint there (or reuses one a previous `--keep` run left) instead of a
temporary directory. Needs free disk for the checkpoint (checked first): ~0.44 GB per layer + 0.5 GB.
`--quick` runs the same on tiny shapes (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISTRAL_7B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000}
QUICK = {"hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2, "vocab": 512}  # --quick: a smoke run
FULL_LAYERS = 32

# Every child reports its own VmHWM at exit: ru_maxrss of a forked child starts from its parent's (this
# process holds a shard while writing), so os.wait4's figure would be this script's, not the child's.
PEAK = """
import atexit, os
from pathlib import Path
def _report_peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            Path(os.environ["BENCH_PEAK_FILE"]).write_text(line.split()[1])
atexit.register(_report_peak)
"""

LOADER = """
import sys
sys.argv = ["loraxs", *sys.argv[1:]]
from loraxs_cli.cli.app import main
main()
"""

# transformers 5 maps safetensors lazily: from_pretrained alone reads (almost) nothing when the dtype is the
# stored one. The SVD of every target reads every weight, so the load is measured through one read of all
# parameters too (a sum each), the memory a loaded model takes once its weights are used.
LOAD = """
import json, sys, time
from pathlib import Path
import torch, transformers
transformers.utils.logging.disable_progress_bar()
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
loaded, loaded_peak = time.perf_counter() - start, rss()
with torch.no_grad():
    for param in model.parameters():
        param.sum()  # in its own dtype: no float32 copy of the largest tensor
print(json.dumps({"from_pretrained_seconds": loaded, "from_pretrained_peak_rss": loaded_peak,
                  "read_all_seconds": time.perf_counter() - start - loaded}))
"""

IMPORTS = """
import torch, transformers, safetensors
from loraxs_cli.cli.app import app
from loraxs_cli import initialize, weights
"""


def layer_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    hidden, intermediate = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * hidden // shape["heads"]
    return {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }


def write_checkpoint(directory: Path, layers: int, layers_per_shard: int, shape: dict, seed: int = 0) -> int:
    """A random bfloat16 Mistral-shaped checkpoint, one shard in memory at a time; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig

    directory.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=layers,
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
        tie_word_embeddings=False, architectures=["MistralForCausalLM"],
    )  # fmt: skip
    config.dtype = torch.bfloat16
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(seed)

    def tensor(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)  # norms
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)

    vocab, hidden = shape["vocab"], shape["hidden"]
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for first in range(0, layers, layers_per_shard):
        group = {}
        for i in range(first, min(first + layers_per_shard, layers)):
            group.update({f"model.layers.{i}.{k}": s for k, s in layer_shapes(shape).items()})
        groups.append(group)
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: tensor(shape) for key, shape in group.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def measured(script: str, args: list[str], env: dict) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes: the child's VmHWM) and stdout of `python -c PEAK + script args`."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", PEAK + script, *args],
            capture_output=True,
            text=True,
            env={**env, "BENCH_PEAK_FILE": str(peak_file)},
        )
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(args[:3])} ... failed ({child.returncode}):\n{child.stderr[-3000:]}")
        return seconds, int(peak_file.read_text()) * 1024, child.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=FULL_LAYERS)
    parser.add_argument("--layers-per-shard", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="Where init's SVD runs (--device of loraxs init).")
    parser.add_argument("--dir", type=Path, help="Write (or reuse) the checkpoint here, not in a temp dir.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint written to --dir.")
    parser.add_argument("--skip-load", action="store_true", help="Measure init only.")
    parser.add_argument("--quick", action="store_true", help="Tiny shapes (hidden 128), 2 layers, rank 8.")
    args = parser.parse_args()
    shape = QUICK if args.quick else MISTRAL_7B
    if args.quick:
        args.layers, args.rank = 2, 8

    root = Path(tempfile.mkdtemp(prefix="bench-init-stream-"))
    model_dir = args.dir or root / "mistral-shaped"
    reused = _reusable(model_dir, args.layers, shape)
    wrote = False
    try:
        started = time.perf_counter()
        if reused:
            checkpoint_bytes = reused
            written_s = None
        else:
            if model_dir.exists() and any(model_dir.iterdir()):
                raise SystemExit(f"{model_dir} holds no {args.layers}-layer checkpoint of this script")
            free, need = (
                shutil.disk_usage(_existing(model_dir)).free / 1e9,
                checkpoint_size(shape, args.layers) / 1e9,
            )
            if free < need * 1.1:
                raise SystemExit(f"not enough free disk: {free:.1f} GB, the checkpoint takes {need:.1f} GB")
            wrote = True
            checkpoint_bytes = write_checkpoint(model_dir, args.layers, args.layers_per_shard, shape)
            written_s = time.perf_counter() - started
        env = {**os.environ, "LORAXS_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        loraxs = ["init", str(model_dir), "--rank", str(args.rank), "--device", args.device, "--json"]
        # The dry run in a home of its own: init then fingerprints the checkpoint itself, as a first run does.
        plan_home = {**env, "LORAXS_HOME": str(root / "plan-home")}
        plan = json.loads(measured(LOADER, [*loraxs, "--dry-run"], plan_home)[2])
        _, baseline_rss, _ = measured(IMPORTS, [], env)
        init_s, init_rss, init_out = measured(LOADER, loraxs, env)
        entry = json.loads(init_out)
        compute_s = entry["seconds"]
        shutil.rmtree(root / "home", ignore_errors=True)  # the factors (~0.7 GB at rank 64, 32 layers)
        report = {
            "shape": shape,
            "layers": args.layers,
            "checkpoint_bytes": checkpoint_bytes,
            "shards": len(list(model_dir.glob("*.safetensors"))),
            "written_seconds": written_s,
            "rank": args.rank,
            "device": args.device,
            "threads": os.environ.get("OMP_NUM_THREADS"),
            "modules": len(entry["modules"]),
            "imports_baseline_rss": baseline_rss,
            "init": {
                "seconds": init_s,
                "compute_seconds": compute_s,  # SVDs and reads: no start-up, planning or fingerprint
                "peak_rss": init_rss,
                "planned_peak_bytes": plan["planned_peak_bytes"],  # beyond the libraries (the dry run)
                "seconds_per_matrix": compute_s / len(entry["modules"]),
            },
        }
        if args.layers < FULL_LAYERS:
            per_layer = compute_s / args.layers
            report["init"]["extrapolated_compute_seconds_32_layers"] = per_layer * FULL_LAYERS
        if not args.skip_load:
            load_s, load_rss, load_out = measured(LOAD, [str(model_dir)], env)
            report["transformers_load"] = {
                "seconds": load_s,
                "peak_rss": load_rss,  # after every weight was read once
                **json.loads(load_out.strip().splitlines()[-1]),
            }
            report["ratios"] = {
                "peak_rss_init_vs_load": init_rss / load_rss,
                "seconds_init_vs_load": init_s / load_s,
            }
        print(json.dumps(report, indent=2))
    finally:
        if wrote and not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def checkpoint_size(shape: dict, layers: int) -> int:
    """Bytes of the bfloat16 checkpoint: the layers, the embeddings and the head."""
    per_layer = sum(math.prod(s) for s in layer_shapes(shape).values())
    return 2 * (layers * per_layer + 2 * shape["vocab"] * shape["hidden"] + shape["hidden"])


def _reusable(directory: Path, layers: int, shape: dict) -> int | None:
    """The bytes of a checkpoint this script wrote there before with these shapes, else None."""
    try:
        config = json.loads((directory / "config.json").read_text())
        index = json.loads((directory / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = {
        "num_hidden_layers": layers,
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
    }
    same = all(config.get(key) == value for key, value in wanted.items())
    return index["metadata"]["total_size"] if same else None


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


if __name__ == "__main__":
    main()
