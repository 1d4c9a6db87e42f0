"""Training on a quantized base (`--quantize`): peak memory and tokens/s of LoRA-XS training steps with the
base in bf16 against the same base with its linear layers in int8 or nf4 (bitsandbytes).

Each variant runs in its own worker process (clean allocator, its own RSS high-water mark), loaded as
`loraxs train` loads it (models.load_model with `quantize`, all in bf16 compute), with LoRA-XS layers on
all 7 projections of every layer (random factors of the right shapes: time and memory do not depend on
their values), AdamW on R. A step is forward + causal-LM loss on random token ids + backward + AdamW
step; --warmup steps first, then the median of --steps timed steps gives tokens/s.

Memory: `tensors` is the bytes of the model's tensors as stored (the quantized weights and their
scales); on CPU `weights` is the RSS the loaded model adds to the process (the libraries, bitsandbytes
in every variant, excluded); `peak` is the process's peak RSS during the steps (VmHWM, reset
through /proc/self/clear_refs once the model is ready) above the same baseline: weights + adapter +
activations + optimizer state. On CUDA, torch.cuda's allocated bytes the same way.

    python benchmarks/bench_quantized.py                 # SmolLM2-135M (real weights), CPU, 4 x 64 tokens
    python benchmarks/bench_quantized.py --device cuda --seq 512
    python benchmarks/bench_quantized.py --quick         # a tiny random Llama (smoke tests: --in-process)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT / "benchmarks")]

from bench_train_step import _settle, _status_bytes  # noqa: E402 - the RSS helpers, once

VARIANTS = ("bf16", "int8", "nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROTOCOL = "@@bench "


def model_dir(args) -> Path:
    if not args.quick:
        from models_for_tests import smollm2_dir

        return smollm2_dir()
    from models_for_tests import save_tiny, tiny_llama

    directory = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    return save_tiny(tiny_llama(vocab_size=1024), directory, tokenizer_from=None)


def tensor_bytes(model) -> int:
    """Bytes of the model's tensors as it stores them (a quantized layer's int8 or packed 4-bit weight and
    its scales; a tied weight once)."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        key = (value.device, value.data_ptr())
        if key not in seen:
            seen.add(key)
            total += value.numel() * value.element_size()
    return total


def worker(variant: str, args) -> dict:
    """One variant in this process: load, inject, take the steps; the figures."""
    import torch

    from loraxs_cli.layer import inject
    from loraxs_cli.linear import compute_dtype, weight_shape
    from loraxs_cli.models import backbone, load_model, resolve_model
    from loraxs_cli.quantize import require_backend

    require_backend("int8")  # the same libraries in every variant's baseline
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    _settle()
    baseline = torch.cuda.memory_allocated() if cuda else _status_bytes("VmRSS")
    quantize = None if variant == "bf16" else variant
    model = load_model(
        resolve_model(args.model_dir), head="causal-lm", dtype="bf16", device=device, quantize=quantize
    )
    model.config.use_cache = False
    tensors = tensor_bytes(model)
    core = backbone(model)
    modules = dict(core.named_modules())
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for name in (n for n in modules if n.rpartition(".")[2] in PROJECTIONS):
        m, n = weight_shape(modules[name])
        dtype = compute_dtype(modules[name])
        A = torch.randn(args.rank, n, generator=gen) / math.sqrt(n)
        B = torch.randn(m, args.rank, generator=gen) / math.sqrt(args.rank)
        factors[name] = (A.to(device, dtype), B.to(device, dtype))
    layers = inject(core, factors, scaling=1.0)
    trainable = [layer.R for layer in layers.values()]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    model.train()
    _settle()
    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() - baseline
        torch.cuda.reset_peak_memory_stats()
    else:
        weights = _status_bytes("VmRSS") - baseline
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    times, loss = [], None
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    seconds = statistics.median(times)
    return {
        "variant": variant,
        "modules": len(layers),
        "tensor_bytes": tensors,
        "weights_bytes": weights,
        "peak_bytes": peak - baseline,
        "step_seconds": seconds,
        "tokens_per_s": args.batch * args.seq / seconds,
        "loss": float(loss.detach()),
    }


def run_worker(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--model-dir", str(args.model_dir)]
    for flag in ("device", "batch", "seq", "rank", "steps", "warmup", "threads"):
        command += [f"--{flag}", str(getattr(args, flag))]
    result = subprocess.run(command, capture_output=True, text=True)
    replies = [line[len(PROTOCOL) :] for line in result.stdout.splitlines() if line.startswith(PROTOCOL)]
    if result.returncode != 0 or not replies:
        raise RuntimeError(f"variant {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(replies[-1])


def print_table(rows: list[dict], args, out) -> None:
    mib = 2**20
    base = next((r for r in rows if r["variant"] == "bf16"), rows[0])
    where = "GPU allocated" if args.device.startswith("cuda") else "RSS above the libraries"
    print(f"LoRA-XS training step, {args.batch} x {args.seq} tokens, rank {args.rank}, {args.device} "
          f"({where}):", file=out)  # fmt: skip
    columns = ("tensors MiB", "weights MiB", "peak MiB", "peak/bf16", "tokens/s", "loss")
    print(f"{'variant':<8}" + "".join(f"{c:>13}" for c in columns), file=out)
    for r in rows:
        values = (
            f"{r['tensor_bytes'] / mib:.0f}",
            f"{r['weights_bytes'] / mib:.0f}",
            f"{r['peak_bytes'] / mib:.0f}",
            f"{r['peak_bytes'] / base['peak_bytes']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['loss']:.3f}",
        )
        print(f"{r['variant']:<8}" + "".join(f"{v:>13}" for v in values), file=out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: bf16, int8, nf4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 1 step")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--in-process", action="store_true", help="every variant in this process (smoke tests: no clean RSS)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(PROTOCOL + json.dumps(worker(args.worker, args)), flush=True)
        return
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup, args.rank = 2, 16, 1, 0, 4
    args.model_dir = model_dir(args)
    run = worker if args.in_process else run_worker
    rows = [run(v, args) for v in args.variants.split(",")]
    if args.json:
        print(
            json.dumps({"device": args.device, "batch": args.batch, "seq": args.seq, "rows": rows}, indent=2)
        )
    else:
        print_table(rows, args, sys.stdout)


if __name__ == "__main__":
    main()
