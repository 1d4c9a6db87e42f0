"""One training step: tokens/s and peak memory of the LoRA-XS layer against PEFT and the frozen base.

Variants, each built fresh in its own worker process (clean allocator, its own RSS high-water mark):

    base      the frozen base with no adapter: the same forward + backward, every weight frozen, the input
              embedding's output made to require grad (transformers' enable_input_require_grads) so the
              backward runs through the whole stack; no optimizer step (nothing to train). What an adapter
              costs on top of this is the adapter's own price.
    loraxs    loraxs_cli.layer.inject with SVD factors (loraxs' own randomized SVD) at --rank; AdamW on R
              (the fused [W; A] path, the default)
    unfused   the same with the fused path off (set_fused(model, False)): a separate base GEMM and A x
    lora      PEFT LoRA, r = alpha = --rank, no dropout, same targets; AdamW on A and B
    psoft     PEFT PSOFT with psoft_orth=False and psoft_mag_a/b=False: a free r x r matrix between frozen
              SVD factors, the same parameter count as LoRA-XS; AdamW on it

Targets: all 7 projections (q, k, v, o, gate, up, down) of every layer. A step is forward + loss (causal LM
on random token ids) + backward + AdamW step + zero_grad; --warmup steps first, then the median of --steps
timed steps gives tokens/s. The workers take their steps in turn (round-robin: one step of each variant,
then the next round), so load from other jobs on a shared machine hits every variant alike; --sequential
runs one variant at a time instead (less memory at once), --in-process all in this process (smoke tests).
Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed part
(everything held: weights, adapter, activations, optimizer state); on CPU the peak RSS (VmHWM, reset through
/proc/self/clear_refs) above the RSS of the loaded base model, so adapter weights and their optimizer state
count and the weights themselves do not.

    python benchmarks/bench_train_step.py                  # CPU: SmolLM2-135M (real weights), 4 x 128
    python benchmarks/bench_train_step.py --device cuda    # Mistral-7B shapes, 8 layers, bf16, 4 x 1024
    python benchmarks/bench_train_step.py --quick          # a tiny random Llama, for smoke tests

GPU targets (issue 3): loraxs >= 0.95x the frozen base's tokens/s, >= 1.5x PEFT LoRA's, at <= 0.7x its peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("base", "loraxs", "unfused", "lora", "psoft")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MISTRAL_7B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
    tie_word_embeddings=True,
)  # fmt: skip
# Per model: batch, seq, layers (None: all), timed steps, warm-up steps.
PRESETS = {
    "smollm2": dict(batch=4, seq=128, layers=None, steps=4, warmup=1),
    "mistral-7b-shapes": dict(batch=4, seq=1024, layers=8, steps=10, warmup=3),
    "tiny": dict(batch=2, seq=32, layers=2, steps=2, warmup=1),
}
PROTOCOL = "@@bench "  # marks the worker's replies on its stdout
TARGETS = {"vs_base_tokens": 0.95, "vs_lora_tokens": 1.5, "vs_lora_memory": 0.7}


# ----------------------------------------------------------------------------------------------
# Worker: one variant, in its own process


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle() -> None:
    """Collect garbage and give freed heap pages back (glibc) so RSS shows what is really held."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model(args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig

    torch.manual_seed(args.seed)
    if args.model == "smollm2":
        root = Path(__file__).resolve().parents[1]
        sys.path[:0] = [
            str(root / "tests"),
            str(root / "scripts"),
        ]  # models_for_tests, bbc_data
        from models_for_tests import smollm2_dir

        model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=dtype).to(device)
        if args.layers:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
    else:
        mistral = args.model == "mistral-7b-shapes"
        config_type, model_type = (MistralConfig, None) if mistral else (LlamaConfig, LlamaForCausalLM)
        config = config_type(
            **(MISTRAL_7B if mistral else TINY),
            num_hidden_layers=args.layers,
            max_position_embeddings=max(args.seq, 4096 if mistral else 256),
        )
        if mistral:
            from transformers import MistralForCausalLM as model_type
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # random weights made in the final dtype, on the final device
        try:
            with torch.device(device):
                model = model_type(config)
        finally:
            torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model.train()


def attach(variant: str, model, args, device) -> list:
    """Add the variant's adapter; return its trainable parameters."""
    if variant == "base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return []
    if variant in ("loraxs", "unfused"):
        from loraxs_cli.factors import SVDSettings, compute_xs_factors
        from loraxs_cli.layer import inject, set_fused, xs_modules
        from loraxs_cli.models import backbone

        core = backbone(model)
        names = [n for n, _ in core.named_modules() if n.rpartition(".")[2] in PROJECTIONS]
        found = compute_xs_factors(core, names, args.rank, SVDSettings(niter=2), device=device)
        factors = {n: (found.tensors[f"{n}.A"], found.tensors[f"{n}.B"]) for n in names}
        inject(core, factors, scaling=1.0, seed=args.seed)
        set_fused(core, variant == "loraxs")
        return [m.R for m in xs_modules(core).values()]
    from peft import get_peft_model

    if variant == "lora":
        from peft import LoraConfig

        config = LoraConfig(
            r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=list(PROJECTIONS)
        )
    else:
        from peft import PsoftConfig

        config = PsoftConfig(
            r=args.rank, psoft_alpha=args.rank, target_modules=list(PROJECTIONS), psoft_orth=False,
            psoft_mag_a=False, psoft_mag_b=False, psoft_svd="lowrank", psoft_svd_lowrank_niter=2,
        )  # fmt: skip
    peft_model = get_peft_model(model, config)
    model.__dict__["_bench_wrapper"] = peft_model  # keep the wrapper alive with the model
    return [p for p in peft_model.parameters() if p.requires_grad]


# Multiply-adds per token of a target (m, n): the frozen base 2 m n (forward W x, backward g W; a frozen
# weight needs no gradient of its own). LoRA-XS and PSOFT add 2 r (m + n): A x and B u forward, g B and
# v A backward (the r x r terms are negligible); LoRA adds the gradients of A and B, half as much again.
# The table holds the adapter's extra work in units of 2 r (m + n).
ADAPTER_WORK = {"base": 0.0, "loraxs": 1.0, "unfused": 1.0, "psoft": 1.0, "lora": 1.5}


def flop_floor(model, variant: str, rank: int) -> float:
    """The best tokens/s a variant can reach against the frozen base if only the arithmetic of the
    linear layers counted: base / (base + adapter), over every nn.Linear of the model (lm_head too)
    and the variant's extra work on the targets. Attention scores and norms are left out (they only
    raise the floor)."""
    import torch

    base = extra = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            m, n = module.out_features, module.in_features
            base += m * n
            if name.rpartition(".")[2] in PROJECTIONS:
                extra += ADAPTER_WORK[variant] * rank * (m + n)
    return base / (base + extra)


class Variant:
    """One variant's model, adapter, optimizer and batch, ready to take timed training steps."""

    def __init__(self, variant: str, args) -> None:
        import torch

        # Imported before the baseline, so that every variant's RSS holds the same libraries.
        with contextlib.suppress(ImportError):
            import peft  # noqa: F401
        if args.threads:
            torch.set_num_threads(args.threads)
        self.torch, self.variant, self.args = torch, variant, args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        self.model = build_model(args, self.device, dtype)
        self.floor = flop_floor(self.model, variant, args.rank)
        _settle()
        self.baseline = torch.cuda.memory_allocated() if self.cuda else _status_bytes("VmRSS")
        self.trainable = attach(variant, self.model, args, self.device)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        gen = torch.Generator().manual_seed(args.seed)
        shape = (args.batch, args.seq)
        self.ids = torch.randint(0, self.model.config.vocab_size, shape, generator=gen).to(self.device)
        self.loss = None
        _settle()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.ready = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self.ready = _status_bytes("VmRSS")

    def step(self) -> float:
        """Forward, backward, optimizer step; the seconds it took."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.optimizer:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.loss = float(loss.detach())
        if not math.isfinite(self.loss):
            raise RuntimeError(f"loss is {self.loss}")
        return seconds

    def summary(self) -> dict:
        peak = self.torch.cuda.max_memory_allocated() if self.cuda else _status_bytes("VmHWM")
        return {
            "variant": self.variant,
            "trainable_params": sum(p.numel() for p in self.trainable),
            "peak_bytes": peak if self.cuda else peak - self.baseline,
            "peak_above_model_bytes": peak - self.baseline,
            "peak_above_ready_bytes": peak - self.ready,  # what the steps add once the adapter is built
            "flop_floor": self.floor,
            "loss": self.loss,
        }


def serve(variant: str, args) -> None:
    """Worker process: build the variant, then answer `step` and `done` lines from the parent."""
    job = Variant(variant, args)
    _reply({"ready": True})
    for line in sys.stdin:
        if line.strip() == "step":
            _reply({"seconds": job.step()})
        elif line.strip() == "done":
            _reply(job.summary())
            return


def _reply(document: dict) -> None:
    print(PROTOCOL + json.dumps(document), flush=True)


def with_timing(row: dict, times: list[float], args) -> dict:
    seconds = statistics.median(times)
    tokens = args.batch * args.seq
    return {**row, "tokens_per_s": tokens / seconds, "step_seconds": seconds, "step_seconds_min": min(times)}


# ----------------------------------------------------------------------------------------------
# Parent: run the variants, print the table


def _peft_version() -> str:
    try:
        import peft
    except ImportError:
        return "not installed"
    return peft.__version__


def psoft_available() -> str | None:
    """None if this PEFT has PSOFT, else the reason it is skipped."""
    try:
        import peft
    except ImportError:
        return "peft is not installed"
    try:
        from peft import PsoftConfig  # noqa: F401
    except ImportError:
        return f"peft {peft.__version__} has no PsoftConfig (PSOFT arrived in a later release)"
    return None


def worker_command(variant: str, args) -> list[str]:
    forwarded = ["--device", args.device, "--dtype", args.dtype, "--model", args.model]
    for name in ("batch", "seq", "rank", "steps", "warmup", "layers", "seed", "threads"):
        if getattr(args, name) is not None:
            forwarded += [f"--{name}", str(getattr(args, name))]
    return [sys.executable, str(Path(__file__).resolve()), "--worker", variant, *forwarded]


class Worker:
    """A variant in its own process (its own allocator and RSS high-water mark), stepped on request."""

    def __init__(self, variant: str, args) -> None:
        self.variant = variant
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the worker
        env = dict(os.environ)
        if not args.device.startswith("cuda"):
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # an idle worker must not spin on the shared cores
        self.process = subprocess.Popen(
            worker_command(variant, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, env=env,
        )  # fmt: skip
        self.ask(None)  # wait until it is built

    def ask(self, command: str | None) -> dict:
        if command:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        self.process.wait()
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().splitlines() if line.strip()]
        raise WorkerFailed(lines[-1] if lines else f"exit code {self.process.returncode}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


class WorkerFailed(Exception):
    pass


def measure(variants: list[str], args, out) -> dict[str, dict]:
    """Build every variant in its own process, then time their steps round-robin (or one variant after the
    other with --sequential), so that load from other jobs on a shared machine hits all variants alike."""
    rows: dict[str, dict] = {}
    groups = [[v] for v in variants] if args.sequential else [variants]
    for group in groups:
        workers: dict[str, Worker] = {}
        times: dict[str, list[float]] = {}
        try:
            for variant in group:
                print(f"building {variant} ...", file=out, flush=True)
                try:
                    workers[variant] = Worker(variant, args)
                    times[variant] = []
                except WorkerFailed as failure:
                    rows[variant] = {"variant": variant, "skipped": str(failure)}
            print(f"stepping {', '.join(workers)} ...", file=out, flush=True)
            for step in range(args.warmup + args.steps):
                for variant in list(workers):
                    try:
                        seconds = workers[variant].ask("step")["seconds"]
                    except WorkerFailed as failure:
                        rows[variant] = {"variant": variant, "skipped": str(failure)}
                        workers.pop(variant).close()
                        continue
                    if step >= args.warmup:
                        times[variant].append(seconds)
            for variant, worker in workers.items():
                rows[variant] = with_timing(worker.ask("done"), times[variant], args)
        finally:
            for worker in workers.values():
                worker.close()
    return {v: rows[v] for v in variants}


def measure_in_process(variants: list[str], args) -> dict[str, dict]:
    rows = {}
    for variant in variants:
        job = Variant(variant, args)
        times = [job.step() for _ in range(args.warmup + args.steps)][args.warmup :]
        rows[variant] = with_timing(job.summary(), times, args)
        del job
        _settle()
    return rows


def ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def add_ratios(rows: dict[str, dict]) -> None:
    base, lora = rows.get("base", {}), rows.get("lora", {})
    for row in rows.values():
        if "skipped" in row:
            continue
        row["tokens_vs_base"] = ratio(row["tokens_per_s"], base.get("tokens_per_s"))
        row["tokens_vs_lora"] = ratio(row["tokens_per_s"], lora.get("tokens_per_s"))
        row["memory_vs_lora"] = ratio(row["peak_bytes"], lora.get("peak_bytes"))
        row["tokens_vs_floor"] = ratio(row["tokens_vs_base"], row.get("flop_floor"))


def check_targets(rows: dict[str, dict]) -> dict[str, dict] | None:
    ours = rows.get("loraxs", {})
    if "skipped" in ours or not ours:
        return None
    found = {
        "vs_base_tokens": ours.get("tokens_vs_base"),
        "vs_lora_tokens": ours.get("tokens_vs_lora"),
        "vs_lora_memory": ours.get("memory_vs_lora"),
    }
    checks = {}
    for name, value in found.items():
        if value is None:
            continue
        goal = TARGETS[name]
        met = value <= goal if name == "vs_lora_memory" else value >= goal
        checks[name] = {"value": value, "target": goal, "met": met}
    return checks


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: dict[str, dict], args, cuda: bool, out) -> None:
    memory = "peak GiB" if cuda else "peak +MiB"
    unit = 2**30 if cuda else 2**20
    print(f"{'variant':10}{'trainable':>12}{'tokens/s':>11}{'vs base':>9}{'floor':>7}{'vs floor':>9}"
          f"{'vs LoRA':>9}{memory:>11}{'vs LoRA':>9}", file=out)  # fmt: skip
    for name, row in rows.items():
        if "skipped" in row:
            print(f"{name:10}  skipped: {row['skipped']}", file=out)
            continue
        print(
            f"{name:10}{row['trainable_params']:>12,}{row['tokens_per_s']:>11,.0f}"
            f"{_fmt(row['tokens_vs_base'], '.3f'):>9}{_fmt(row.get('flop_floor'), '.3f'):>7}"
            f"{_fmt(row.get('tokens_vs_floor'), '.3f'):>9}{_fmt(row['tokens_vs_lora'], '.3f'):>9}"
            f"{row['peak_bytes'] / unit:>11.{2 if cuda else 0}f}{_fmt(row['memory_vs_lora'], '.3f'):>9}",
            file=out,
        )
    if not cuda:
        print("peak +MiB: peak RSS of the steps above the loaded base model (adapter, activations, "
              "gradients, optimizer state)", file=out)  # fmt: skip
        steps_only = [
            f"{n} {r['peak_above_ready_bytes'] / unit:.0f}" for n, r in rows.items() if "skipped" not in r
        ]
        print(
            f"the steps alone, above the model with its adapter built (MiB): {', '.join(steps_only)}",
            file=out,
        )


def print_targets(checks: dict | None, cuda: bool, out) -> None:
    if not cuda:
        print("targets (>= 0.95x base tokens/s, >= 1.5x LoRA tokens/s, <= 0.7x LoRA peak) are for CUDA "
              "with Mistral-7B shapes; on CPU only the ratios are printed", file=out)  # fmt: skip
        return
    labels = {
        "vs_base_tokens": "loraxs tokens/s vs frozen base",
        "vs_lora_tokens": "loraxs tokens/s vs PEFT LoRA",
        "vs_lora_memory": "loraxs peak memory vs PEFT LoRA",
    }
    for name, check in (checks or {}).items():
        sign = "<=" if name == "vs_lora_memory" else ">="
        verdict = "met" if check["met"] else "NOT met"
        print(f"target {labels[name]}: {check['value']:.3f} ({sign} {check['target']}): {verdict}", file=out)


def apply_presets(args) -> None:
    import torch

    if args.quick:
        args.model = "tiny"
    cuda = args.device.startswith("cuda")
    if args.model == "auto":
        args.model = "mistral-7b-shapes" if cuda else "smollm2"
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    for name, value in PRESETS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rank is None:
        args.rank = 4 if args.model == "tiny" else 64
    args.threads = args.threads or torch.get_num_threads()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="weights (auto: fp32 on CPU, bf16 on CUDA)")  # fmt: skip
    parser.add_argument("--model", choices=["auto", *PRESETS], default="auto",
                        help="auto: smollm2 (real weights) on CPU, mistral-7b-shapes on CUDA")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row")
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (default 64; 4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (mistral-7b-shapes: 8)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 x 32 tokens, 2 steps")
    parser.add_argument("--in-process", action="store_true",
                        help="all variants in this process (fast; memory less isolated)")  # fmt: skip
    parser.add_argument("--sequential", action="store_true",
                        help="one variant after another (default: steps round-robin)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout (table on stderr)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        serve(args.worker, args)
        return
    apply_presets(args)
    out = sys.stderr if args.json else sys.stdout
    cuda = args.device.startswith("cuda")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r}: use {', '.join(VARIANTS)}")
    peft_version = _peft_version()
    print(
        f"device {args.device}, {args.dtype}, model {args.model}"
        f"{f' ({args.layers} layers)' if args.layers else ''}, batch {args.batch} x {args.seq} tokens, "
        f"rank {args.rank}, all 7 projections, {args.warmup} warm-up + {args.steps} timed steps, "
        f"threads {args.threads}, peft {peft_version}",
        file=out,
    )
    skipped = {}
    if "psoft" in variants and psoft_available():
        skipped["psoft"] = {"variant": "psoft", "skipped": psoft_available()}
    measured = [v for v in variants if v not in skipped]
    found = measure_in_process(measured, args) if args.in_process else measure(measured, args, out)
    rows = {v: skipped.get(v) or found[v] for v in variants}
    add_ratios(rows)
    print_table(rows, args, cuda, out)
    checks = check_targets(rows) if cuda else None
    print("floor: the tokens/s against the frozen base that the adapter's extra arithmetic allows "
          "(linear layers: base m n, adapter r (m + n) per target, LoRA 1.5x that)", file=out)  # fmt: skip
    print_targets(checks, cuda, out)
    if args.json:
        settings = {k: getattr(args, k) for k in ("device", "dtype", "model", "batch", "seq", "rank", "steps",
                                                  "warmup", "layers", "seed", "threads")}  # fmt: skip
        document = {
            "settings": settings,
            "peft": peft_version,
            "rows": list(rows.values()),
            "targets": checks,
        }
        print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
