"""Streaming `loraxs merge` against PEFT `merge_and_unload()` + `save_pretrained` for the same adapter.

Both run in fresh subprocesses on one random Llama (default ~120M parameters, fp32, 4 shards);
the adapter is exported with `loraxs convert --to peft-lora` so both fold the same update.
Prints time and peak RSS (added by the merge, over the process's state before it) as ratios.

    python benchmarks/bench_merge.py [--layers 12] [--hidden 768] [--rank 16] [--shard 200MB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HWM = """
from pathlib import Path
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
"""

LORAXS = (
    HWM
    + """
import json, sys, time
from loraxs_cli.merge import plan_merge, run_merge
import torch, transformers  # imported by both sides before the measurement
plan = plan_merge(sys.argv[1], sys.argv[2], sys.argv[3])
Path("/proc/self/clear_refs").write_text("5"); before = rss(); start = time.perf_counter()
run_merge(plan)
print(json.dumps({"seconds": time.perf_counter() - start, "added": hwm() - before}))
"""
)

PEFT = (
    HWM
    + """
import json, sys, time
import torch, transformers
from peft import PeftModel
Path("/proc/self/clear_refs").write_text("5"); before = rss(); start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
merged.save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
print(json.dumps({"seconds": time.perf_counter() - start, "added": hwm() - before}))
"""
)


def run(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard", default="200MB")
    parser.add_argument("--device", default="cpu", help="Where the SVD of `init` runs (merges are on CPU).")
    args = parser.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models_for_tests import make_adapter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LORAXS_HOME"] = str(root / "home")
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers,
            num_attention_heads=12,
            num_key_value_heads=4,
            vocab_size=32000,
            tie_word_embeddings=False,
        )
        model_dir = root / "base"
        LlamaForCausalLM(config).save_pretrained(model_dir, max_shard_size=args.shard)
        del config
        adapter = make_adapter(model_dir, root / "xs", rank=args.rank)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "loraxs_cli",
                "-q",
                "convert",
                str(adapter),
                "--to",
                "peft-lora",
                "--out",
                str(root / "peft"),
            ],
            check=True,
        )
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        shards = len(list(model_dir.glob("*.safetensors")))
        ours = run(LORAXS, str(model_dir), str(adapter), str(root / "merged-loraxs"))
        peer = run(PEFT, str(model_dir), str(root / "peft"), str(root / "merged-peft"), args.shard)
    mib = 2**20
    print(
        f"checkpoint: {size / mib:.0f} MiB in {shards} shards, rank {args.rank}, "
        f"7 projections x {args.layers} layers"
    )
    print(f"{'':24}{'seconds':>10}{'peak +MiB':>12}")
    print(f"{'loraxs merge':24}{ours['seconds']:>10.2f}{ours['added'] / mib:>12.0f}")
    print(f"{'peft merge_and_unload':24}{peer['seconds']:>10.2f}{peer['added'] / mib:>12.0f}")
    print(
        f"ratios (loraxs / peft): time {ours['seconds'] / peer['seconds']:.2f}x, "
        f"peak memory {ours['added'] / peer['added']:.2f}x"
    )


if __name__ == "__main__":
    main()
