"""One GPU check: correctness on CUDA and the GPU benchmarks, as one JSON document on stdout.

    bash benchmarks/gpu_check.sh            # on one H100/H200: about 5 minutes (budget: 8)
    bash benchmarks/gpu_check.sh --cpu      # the same checks at CPU sizes (CI runs it: about a minute)

Sections (each runs alone; a failure is recorded in its section and the rest still run):

    correctness.layer            the LoRA-XS layer in bf16 (fused [W; A] path and unfused) against float64:
                                 output, input gradient and R's gradient, max error / max |reference|
    correctness.checkpointing    a small Llama with LoRA-XS on every projection: loss and every R gradient
                                 with gradient checkpointing (non-reentrant) against without
    correctness.init_device      `init` factors computed on the GPU against the CPU's (same seeds): max
                                 |B_gpu A_gpu - B_cpu A_cpu| / max |B_cpu A_cpu|
    correctness.merge_verify     `loraxs merge --verify` of a random adapter: the merged model's logits
                                 against base + adapter
    train_step                   benchmarks/bench_train_step.py: Mistral-7B shapes, 8 layers, bf16, batch
                                 4 x 1024, all 7 projections; loraxs against PEFT LoRA and the frozen base
    svd                          benchmarks/bench_svd.py: 224 random Mistral-7B-shaped matrices, rank 64
    multi                        benchmarks/bench_multi.py: 1,000 distinct adapters in one batch against one
                                 shared adapter, decode and prefill, Mistral-7B shapes, 8 layers, bf16

`targets` at the end collects the issue's GPU targets with the measured value and met / not met; on
--cpu the targets are not judged (the CPU sizes say nothing of them) and only the checks' tolerances are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # loraxs_cli from this tree; models_for_tests

# Tolerances of the correctness checks (max error / max |reference|).
TOLERANCE = {"layer_bf16": 3e-2, "checkpointing": 1e-5, "init_device": 1e-4, "merge_verify": 1e-4}
# GPU targets (issue 17, section 5).
TARGETS = {
    "train_step.tokens_vs_base": (">=", 0.95),
    "train_step.tokens_vs_lora": (">=", 1.5),
    "train_step.memory_vs_lora": ("<=", 0.7),
    "svd.seconds_224_rank64": ("<=", 3.5),
    "multi.decode_vs_shared": (">=", 0.97),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def section(name: str, results: dict, fn, *args) -> None:
    """Run one check; record its result, its seconds and any failure under `name`."""
    log(f"[{name}] ...")
    started = time.perf_counter()
    try:
        found = fn(*args)
        found["ok"] = found.get("ok", True)
    except Exception as error:  # recorded, and the next section runs
        found = {
            "ok": False,
            "error": f"{type(error).__name__}: {error}".splitlines()[0],
            "traceback": traceback.format_exc(limit=4),
        }
    found["seconds"] = round(time.perf_counter() - started, 2)
    results[name] = found
    log(f"[{name}] {'ok' if found['ok'] else 'FAILED: ' + found.get('error', '')} in {found['seconds']} s")


def relative(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    b64 = b.double()
    return float((a.double() - b64).abs().max() / b64.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- checks


def check_layer(device: str, cpu: bool) -> dict:
    import torch
    from torch import nn

    from loraxs_cli.layer import XSLinear

    n = m = 256 if cpu else 4096
    r, tokens = (16, 256) if cpu else (64, 4096)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64) / n**0.5
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    A64, B64 = (s[:r, None] * vh[:r]), u[:, :r]
    R0 = torch.randn(r, r, generator=gen, dtype=torch.float64) * 0.1
    x64 = torch.randn(tokens, n, generator=gen, dtype=torch.float64).to(device)
    g64 = torch.randn(tokens, m, generator=gen, dtype=torch.float64).to(device)

    # float64 reference, plain autograd
    Rref = R0.to(device).clone().requires_grad_(True)
    xref = x64.clone().requires_grad_(True)
    yref = xref @ weight.to(device).T + 0.5 * xref @ A64.to(device).T @ Rref.T @ B64.to(device).T
    yref.backward(g64)
    found = {"shape": [m, n], "rank": r, "tokens": tokens}
    for fuse in (True, False):
        base = nn.Linear(n, m, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            base.weight.copy_(weight.to(device))
        layer = XSLinear(base, A64, B64, 0.5, R=R0.float(), fuse=fuse)
        x = x64.to(torch.bfloat16).requires_grad_(True)
        y = layer(x)
        y.backward(g64.to(torch.bfloat16))
        errors = {
            "y": relative(y, yref),
            "grad_x": relative(x.grad, xref.grad),
            "grad_R": relative(layer.R.grad, Rref.grad),
        }
        found["fused" if fuse else "unfused"] = {"path_fused": layer.fused, **errors}
    worst = max(v for key in ("fused", "unfused") for k, v in found[key].items() if k != "path_fused")
    found.update(max_error=worst, tolerance=TOLERANCE["layer_bf16"], ok=worst <= TOLERANCE["layer_bf16"])
    return found


def check_checkpointing(device: str, cpu: bool) -> dict:
    import torch

    from loraxs_cli.factors import SVDSettings, compute_xs_factors
    from loraxs_cli.layer import inject, xs_modules
    from models_for_tests import tiny_llama

    size = (
        dict(hidden_size=64, intermediate_size=128) if cpu else dict(hidden_size=1024, intermediate_size=2816)
    )
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(vocab_size=1000, seed=0, num_attention_heads=8, num_key_value_heads=4, **size)
        model.to(device)
        names = [n for n, _ in model.model.named_modules() if n.endswith("_proj")]
        found = compute_xs_factors(model.model, names, 8, SVDSettings(), device=device)
        factors = {k: (found.tensors[f"{k}.A"], found.tensors[f"{k}.B"]) for k in names}
        layers = inject(model.model, factors, 1.0, seed=0, init_std=0.02)
        model.train()
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = [0]

        def count(*_, calls=calls):  # a pre-hook: an early-stopped recompute never returns
            calls[0] += 1

        next(iter(layers.values())).register_forward_pre_hook(count)
        ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        r_grads = {k: v.R.grad.detach().clone() for k, v in xs_modules(model.model).items()}
        grads.append((loss.detach(), r_grads, calls[0]))
        del model, layers
    worst = max(relative(grads[1][1][k], grads[0][1][k]) for k in grads[0][1])
    loss_diff = abs(float(grads[1][0]) - float(grads[0][0]))
    recomputed = grads[1][2] == 2 * grads[0][2]  # checkpointing ran each layer's forward again in backward
    return {
        "modules": len(grads[0][1]),
        "loss_abs_diff": loss_diff,
        "max_grad_R_error": worst,
        "forward_calls": [grads[0][2], grads[1][2]],
        "recomputed": recomputed,
        "tolerance": TOLERANCE["checkpointing"],
        "ok": recomputed and worst <= TOLERANCE["checkpointing"] and loss_diff <= 1e-5,
    }


def check_init_device(device: str, cpu: bool, work: Path) -> dict:
    import torch

    from loraxs_cli.cache import FactorCache
    from loraxs_cli.initialize import FactorRequest, ensure_factors, plan_factors
    from models_for_tests import save_tiny, tiny_llama

    size = (
        dict(hidden_size=64, intermediate_size=128) if cpu else dict(hidden_size=2048, intermediate_size=5632)
    )
    model_dir = save_tiny(
        tiny_llama(vocab_size=1000, seed=0, **size), work / "init-model", tokenizer_from="chatml"
    )
    entries = {}
    for where in ("cpu", device):
        cache = FactorCache(work / f"cache-{where.replace(':', '-')}")
        request = FactorRequest(model=str(model_dir), rank=16, device=None if where == "cpu" else where)
        plan = plan_factors(request, cache)
        entry, _ = ensure_factors(plan, cache)
        entries[where] = entry.load(16, plan.targets)
    worst = 0.0
    for name, cpu_pair in entries["cpu"].items():
        other = entries[device][name]
        worst = max(worst, relative(other["B"] @ other["A"], cpu_pair["B"] @ cpu_pair["A"]))
    same_device = device == "cpu"
    exact = all(torch.equal(entries[device][k]["A"], v["A"]) for k, v in entries["cpu"].items())
    return {
        "compared": f"{device} vs cpu",
        "modules": len(entries["cpu"]),
        "max_BA_error": worst,
        "bitwise_equal": exact,
        "tolerance": TOLERANCE["init_device"],
        "ok": exact if same_device else worst <= TOLERANCE["init_device"],
    }


def check_merge_verify(device: str, cpu: bool, work: Path) -> dict:
    from models_for_tests import make_adapter, save_tiny, tiny_llama

    model_dir = save_tiny(tiny_llama(vocab_size=1000, seed=0), work / "merge-model", tokenizer_from="chatml")
    adapter = make_adapter(model_dir, work / "merge-adapter", rank=4, r_std=0.05)
    command = [
        sys.executable,
        "-m",
        "loraxs_cli",
        "merge",
        str(model_dir),
        "--adapter",
        str(adapter),
        "--out",
        str(work / "merged"),
        "--verify",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(work))
    if result.returncode != 0:
        return {"ok": False, "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    verify = json.loads(result.stdout)["verify"]
    diff = verify["relative_diff"]
    return {
        "device": "cpu (merge runs on the CPU)",
        "relative_diff": diff,
        "tolerance": TOLERANCE["merge_verify"],
        "ok": diff <= TOLERANCE["merge_verify"],
    }


# ---------------------------------------------------------------------------------------------- benchmarks


def _env(work: Path) -> dict:
    env = dict(os.environ)
    env["LORAXS_HOME"] = str(work / "loraxs-home")  # never the user's own cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _script_json(work: Path, script: str, *args: str, timeout: int) -> dict:
    command = [sys.executable, str(BENCHMARKS / script), *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(work))
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(result.stdout)


def bench_train(device: str, cpu: bool, work: Path) -> dict:
    args = ["--quick", "--threads", "2", "--in-process"] if cpu else ["--device", device]
    doc = _script_json(work, "bench_train_step.py", *args, timeout=360)
    rows = {row["variant"]: row for row in doc["rows"]}
    ours = rows["loraxs"]
    keys = (
        "tokens_per_s",
        "tokens_vs_base",
        "flop_floor",
        "tokens_vs_floor",
        "tokens_vs_lora",
        "memory_vs_lora",
        "peak_bytes",
    )
    return {
        "settings": doc["settings"],
        "peft": doc["peft"],
        "rows": {n: {k: row.get(k) for k in keys} for n, row in rows.items() if "skipped" not in row},
        "tokens_vs_base": ours["tokens_vs_base"],
        "tokens_vs_lora": ours["tokens_vs_lora"],
        "memory_vs_lora": ours["memory_vs_lora"],
        "flop_floor": ours["flop_floor"],
    }


def bench_svd(device: str, cpu: bool, work: Path) -> dict:
    shapes = ["--random", "smollm2", "--layers", "2", "--ranks", "16"] if cpu else ["--random", "mistral-7b"]
    doc = _script_json(
        work,
        "bench_svd.py",
        *shapes,
        "--niter",
        "4",
        "--device",
        device,
        *([] if cpu else ["--ranks", "64"]),
        timeout=240,
    )
    row = doc["rows"][0]
    return {
        "matrices": row["matrices"],
        "rank": row["rank"],
        "niter": row["niter"],
        "seconds_224_rank64": row["seconds"] if not cpu else None,
        "seconds": row["seconds"],
    }


def bench_multi(device: str, cpu: bool, work: Path) -> dict:
    sizes = (
        ["--rows", "32", "--layers", "1", "--repeats", "1"]
        if cpu
        else ["--rows", "1000", "--shapes", "mistral7b", "--layers", "8", "--dtype", "bf16"]
    )
    doc = _script_json(
        work, "bench_multi.py", *sizes, "--device", device, "--no-loop", "--memory-adapters", "0", timeout=240
    )
    phases = doc["phases"]
    return {
        "rows": doc["settings"]["rows"],
        "adapters": doc["settings"]["adapters"],
        "decode_vs_shared": phases["decode"]["multi_vs_shared"],
        "prefill_vs_shared": phases["prefill"]["multi_vs_shared"],
        "decode_vs_base": phases["decode"]["multi_vs_base"],
        "phases": phases,
    }


# ---------------------------------------------------------------------------------------------- main


def environment(device: str) -> dict:
    import torch

    found = {"torch": torch.__version__, "device": device, "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda") and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(device)
        found["cuda"] = torch.version.cuda
    try:
        import transformers

        found["transformers"] = transformers.__version__
    except ImportError:
        found["transformers"] = None
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        found["peft"] = None
    return found


def judge(results: dict) -> dict:
    targets = {}
    for key, (sign, goal) in TARGETS.items():
        name, field = key.split(".", 1)
        value = results.get(name, {}).get(field)
        if value is None:
            targets[key] = {"value": None, "target": f"{sign} {goal}", "met": None}
            continue
        met = value >= goal if sign == ">=" else value <= goal
        targets[key] = {"value": value, "target": f"{sign} {goal}", "met": met}
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="CPU sizes on the CPU (what CI runs)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --cpu")
    parser.add_argument("--only", default=None, help="comma-separated section names (default: all)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cpu" if args.cpu else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run with --cpu for the CPU-sized check"}))
        return 2
    started = time.perf_counter()
    document = {
        "check": "loraxs gpu_check",
        "mode": "cpu" if args.cpu else "gpu",
        "environment": environment(device),
    }
    results: dict = {}
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="loraxs-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ["LORAXS_HOME"] = str(work / "loraxs-home")  # this process's own factor cache
        plan = [
            ("correctness.layer", check_layer, device, args.cpu),
            ("correctness.checkpointing", check_checkpointing, device, args.cpu),
            ("correctness.init_device", check_init_device, device, args.cpu, work),
            ("correctness.merge_verify", check_merge_verify, device, args.cpu, work),
            ("train_step", bench_train, device, args.cpu, work),
            ("svd", bench_svd, device, args.cpu, work),
            ("multi", bench_multi, device, args.cpu, work),
        ]
        for name, fn, *fn_args in plan:
            if wanted is None or name in wanted or name.split(".")[0] in wanted:
                section(name, results, fn, *fn_args)
    document["results"] = results
    document["targets"] = None if args.cpu else judge(results)
    document["all_checks_ok"] = all(r["ok"] for r in results.values())
    document["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(document, indent=2))
    return 0 if document["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
