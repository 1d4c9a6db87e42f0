"""Peak memory of a DPO run (`train --task preference`) against an SFT run of the same shape.

The base is its own reference model (the adapter switched off for the reference pass, preference.py), so
DPO should need no more memory than supervised fine-tuning on the same sequences: no second model, and
the reference pass runs without gradients, its activations freed as it goes, before the policy's pass.

Both runs go through `loraxs_cli.train.train`, each in a fresh worker process (its own allocator and RSS
high-water mark), on the same sequences at the same batch:

    dpo   N pairs {"prompt", "chosen", "rejected"}, --batch-size B (pairs): 2 B sequences per forward
    sft   the same 2 N sequences as prompt/response rows (each chosen and each rejected answer a row),
          --batch-size 2 B: the same 2 B sequences per forward, the same tokens

The factors are computed once before (`init`), so both runs get a cache hit. Peak memory: on CUDA
torch.cuda.max_memory_allocated from the first step to the end; on CPU the peak RSS (VmHWM, reset through
/proc/self/clear_refs when the loop starts) above the RSS there, i.e. what the steps add (activations,
logits, R's optimizer state), and the whole process's peak RSS beside it.

    python benchmarks/bench_preference_memory.py                 # SmolLM2-135M (real weights), CPU
    python benchmarks/bench_preference_memory.py --device cuda
    python benchmarks/bench_preference_memory.py --model DIR --pairs 8 --steps 2 --max-length 32

Target (issue 19): DPO's peak <= 1.1x SFT's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.1


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_data(directory: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    """Arithmetic pairs (right answer chosen, a wrong one rejected) and the same sequences as SFT rows."""
    rng = random.Random(seed)
    dpo, sft = [], []
    for _ in range(pairs):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"Question: what is {a} plus {b}? Answer with the number.\nAnswer:"
        right, wrong = f" {a + b}", f" {a + b + rng.choice([-11, -10, -1, 1, 10, 11])}"
        dpo.append({"prompt": prompt, "chosen": right, "rejected": wrong})
        sft += [{"prompt": prompt, "response": right}, {"prompt": prompt, "response": wrong}]
    paths = directory / "pairs.jsonl", directory / "sequences.jsonl"
    for path, rows in zip(paths, (dpo, sft), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def worker(args: argparse.Namespace) -> None:
    """One run (dpo or sft); prints its memory figures as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from loraxs_cli.train import TrainConfig, TrainEvents, train

    cuda = args.device.startswith("cuda")
    marks: dict = {}

    def started(step: int, total: int) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            marks["start"] = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
            marks["start"] = _status_bytes("VmRSS")

    preference = args.worker == "dpo"
    config = TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        task="preference" if preference else "causal-lm",
        rank=args.rank,
        batch_size=args.batch_size if preference else 2 * args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        save_every=0,
        log_every=args.steps,
        device=args.device,
        seed=0,
    )
    result = train(config, TrainEvents(start=started))
    if cuda:
        peak, whole = torch.cuda.max_memory_allocated() - marks["start"], torch.cuda.max_memory_allocated()
    else:
        peak, whole = _status_bytes("VmHWM") - marks["start"], _status_bytes("VmHWM")
    print(json.dumps({"run": args.worker, "peak_bytes": peak, "process_peak_bytes": whole,
                      "final_loss": result.final_loss, "steps": result.steps}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="Base model directory (default: SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument(
        "--batch-size", type=int, default=4, help="Pairs per micro-batch (SFT: twice as many)."
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON document.")
    parser.add_argument("--worker", choices=("dpo", "sft"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from models_for_tests import smollm2_dir

        args.model = str(smollm2_dir())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "LORAXS_HOME": str(work / "home"), "OMP_NUM_THREADS": str(args.threads)}
        pairs, sequences = write_data(work, args.pairs)
        init = [sys.executable, "-m", "loraxs_cli", "init", args.model, "--rank", str(args.rank), "-q"]
        subprocess.run(init, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        rows = {}
        for run, data in (("dpo", pairs), ("sft", sequences)):
            command = [
                sys.executable, __file__, "--worker", run, "--model", args.model, "--data", str(data),
                "--out", str(work / run), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--max-length", str(args.max_length), "--rank", str(args.rank), "--device", args.device,
                "--threads", str(args.threads),
            ]  # fmt: skip
            done = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=ROOT)
            rows[run] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = rows["dpo"]["peak_bytes"] / max(rows["sft"]["peak_bytes"], 1)
    process_ratio = rows["dpo"]["process_peak_bytes"] / max(rows["sft"]["process_peak_bytes"], 1)
    settings = {k: getattr(args, k) for k in ("pairs", "batch_size", "steps", "max_length", "rank", "device")}
    doc = {"settings": {**settings, "model": args.model}, "rows": [rows["dpo"], rows["sft"]],
           "peak_ratio": ratio, "process_peak_ratio": process_ratio, "target": TARGET,
           "meets_target": ratio <= TARGET}  # fmt: skip
    what = "allocated" if args.device.startswith("cuda") else "RSS"
    lines = [
        f"DPO vs SFT, {args.pairs} pairs, {args.batch_size} pairs ({2 * args.batch_size} sequences) per "
        f"batch, {args.max_length} tokens at most, {args.steps} steps, {args.device}",
        f"{'run':<5} {'peak added by the steps (' + what + ')':>36} {'process peak':>14}",
    ]
    for row in doc["rows"]:
        peak, whole = row["peak_bytes"] / 2**20, row["process_peak_bytes"] / 2**20
        lines.append(f"{row['run']:<5} {peak:>32.1f} MiB {whole:>10.1f} MiB")
    lines.append(f"DPO / SFT: {ratio:.3f} of the steps' peak, {process_ratio:.3f} of the process peak "
                 f"(target <= {TARGET}: {'met' if doc['meets_target'] else 'NOT met'})")  # fmt: skip
    print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
