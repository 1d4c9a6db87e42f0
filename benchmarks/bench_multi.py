"""Many adapters in one batch: the stacked multi-adapter layer against its peers, measured side by side.

One batch of ROWS rows, each with its own adapter (ROWS distinct adapters by default), through a stack of
LAYERS x 7 projections (q, k, v, o, gate, up, down) with SmolLM2 (default) or Mistral-7B shapes:

    base      the bare base layers, no adapter
    shared    the same batch with one shared adapter (the single-adapter LoRA-XS layer)
    multi     stacked R, one gathered r x r product per row, fused [W; A] GEMM (loraxs default)
    naive     stacked R without fusion: separate x A^T, gathered bmm, z B^T
    loop      adapter by adapter: swap R in, run that adapter's rows, repeat (skip with --no-loop); timed
              over the first --loop-adapters adapters and scaled linearly to all

in decode (one new token per row) and prefill (--prefill-len tokens per row). Ratios are throughput
ratios (time of the peer / time of multi, >1 means multi is faster). Then the resident memory of
--memory-adapters SmolLM2 adapters at rank 16 stacked in a random-weight SmolLM2 (real config, all 7
projections of 30 layers), measured as the process RSS (CPU) or allocated memory (CUDA).

    python benchmarks/bench_multi.py                      # CPU default: a few minutes
    python benchmarks/bench_multi.py --device cuda --dtype bf16 --shapes mistral7b --layers 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time

import torch
from torch import nn

from loraxs_cli.layer import inject
from loraxs_cli.multi import inject_multi

SHAPES = {  # (hidden, kv width, intermediate)
    "smollm2": (576, 192, 1536),
    "mistral7b": (4096, 1024, 14336),
}
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
)  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection."""
    h, kv, inter = SHAPES[shape]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}  # fmt: skip


class ProjectionStack(nn.Module):
    """LAYERS x 7 linear projections, each applied to a fixed input of its width (no attention math)."""

    def __init__(self, layers: int, shape: str):
        super().__init__()
        shapes = projection_shapes(shape)
        self.layers = nn.ModuleList(
            nn.ModuleDict({p: nn.Linear(shapes[p][1], shapes[p][0], bias=False) for p in PROJECTIONS})
            for _ in range(layers)
        )

    def forward(self, x_hidden: torch.Tensor, x_inter: torch.Tensor) -> None:
        for layer in self.layers:
            for name in PROJECTIONS:
                layer[name](x_inter if name == "down_proj" else x_hidden)


def factors_for(model: nn.Module, rank: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in PROJECTIONS:
            m, n = module.weight.shape
            found[name] = (
                torch.randn(rank, n, generator=gen) / n**0.5,
                torch.randn(m, rank, generator=gen) / m**0.5,
            )
    return found


def round_robin(runs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per run; the runs alternate within each repeat so that load on a shared
    machine hits them alike (one warm-up each first)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_phase(args, device, dtype, tokens: int) -> dict[str, float]:
    torch.manual_seed(0)
    h, _, inter = SHAPES[args.shapes]
    base = ProjectionStack(args.layers, args.shapes).to(device=device, dtype=dtype)
    x_h = torch.randn(args.rows, tokens, h, device=device, dtype=dtype)
    x_i = torch.randn(args.rows, tokens, inter, device=device, dtype=dtype)
    factors = factors_for(base, args.rank)
    n = args.adapters
    stacks = {name: torch.randn(n, args.rank, args.rank) * 0.1 for name in factors}
    index = (torch.arange(args.rows) % n).to(device)
    models = {name: copy.deepcopy(base) for name in ("shared", "multi", "naive")}
    layers = inject(models["shared"], factors, 1.0, R={name: s[0] for name, s in stacks.items()})
    multis = {
        label: inject_multi(models[label], factors, stacks, fused=label == "multi")
        for label in ("multi", "naive")
    }
    runs = {
        "base": lambda: base(x_h, x_i),
        "shared": lambda: models["shared"](x_h, x_i),
        "multi": lambda: models["multi"](x_h, x_i),
        "naive": lambda: models["naive"](x_h, x_i),
    }
    if not args.no_loop:
        on_device = {name: s.to(device) for name, s in stacks.items()}
        # The loop's cost is linear in the adapters: time the first --loop-adapters and scale up.
        looped = min(n, args.loop_adapters)
        groups = [(a, (index == a).nonzero().view(-1)) for a in range(looped)]

        def loop() -> None:
            for a, rows in groups:
                for name, layer in layers.items():
                    layer.R.data = on_device[name][a]  # pointer swap, as a server would
                models["shared"](x_h[rows], x_i[rows])
            for name, layer in layers.items():
                layer.R.data = on_device[name][0]

        runs["loop"] = loop
    with torch.no_grad(), multis["multi"].select(index), multis["naive"].select(index):
        results = round_robin(runs, device, args.repeats)
    if "loop" in results:
        results["loop"] *= n / looped
    return results


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def bench_memory(args, device) -> dict[str, float]:
    """RSS (or CUDA allocation) of N stacked SmolLM2 adapters (rank 16, 210 modules) in a real-shaped
    random-weight model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraxs_cli.multi import load_multi  # noqa: F401  (the same layer the CLI uses)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device).eval()
    gc.collect()
    _trim_heap()
    before = resident_bytes(device)
    factors = factors_for(model.model, args.memory_rank)
    stacks = {}
    for name in factors:  # made one module at a time so the peak stays at the resident size
        stacks[name] = torch.randn(args.memory_adapters, args.memory_rank, args.memory_rank, device=device)
    multi = inject_multi(model.model, factors, stacks)
    del stacks
    gc.collect()
    _trim_heap()
    after = resident_bytes(device)
    modules = len(multi.layers)
    ideal = args.memory_adapters * modules * args.memory_rank**2 * 4
    held = sum(layer.R.nbytes for layer in multi.layers.values())
    with torch.no_grad(), multi.select(torch.arange(8) % args.memory_adapters):
        model(torch.randint(0, 1000, (8, 4), device=device))  # it runs
    return {"modules": modules, "added_bytes": after - before, "ideal_R_bytes": ideal, "held_bytes": held}


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc) so that RSS shows what is really held."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--adapters", type=int, default=None, help="Distinct adapters (default: --rows).")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--prefill-len", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-loop", action="store_true", help="Skip the adapter-by-adapter loop.")
    parser.add_argument(
        "--loop-adapters", type=int, default=100, help="Time the loop over this many adapters, scaled to all."
    )
    parser.add_argument("--memory-adapters", type=int, default=10_000, help="0 skips the memory figure.")
    parser.add_argument("--memory-rank", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout (text on stderr)")
    args = parser.parse_args()
    out = sys.stderr if args.json else sys.stdout
    document = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "phases": {}}
    args.adapters = args.adapters or args.rows
    document["settings"]["adapters"] = args.adapters
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(
        f"device {device}, {args.dtype}, {args.shapes} shapes, {args.layers} layers x 7 projections, "
        f"rank {args.rank}, {args.rows} rows, {args.adapters} distinct adapters, "
        f"threads {torch.get_num_threads()}",
        file=out,
    )
    for phase, tokens in (("decode", 1), ("prefill", args.prefill_len)):
        r = bench_phase(args, device, dtype, tokens)
        ms = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r.items())
        print(f"{phase} ({tokens} token/row): {ms}", file=out)
        document["phases"][phase] = {
            "seconds": r,
            "multi_vs_base": r["base"] / r["multi"],
            "multi_vs_shared": r["shared"] / r["multi"],
            "naive_vs_shared": r["shared"] / r["naive"],
            **({"multi_vs_loop": r["loop"] / r["multi"]} if "loop" in r else {}),
        }
        line = (
            f"  multi vs base {r['base'] / r['multi']:.3f}, vs shared {r['shared'] / r['multi']:.3f}; "
            f"naive vs base {r['base'] / r['naive']:.3f}, vs shared {r['shared'] / r['naive']:.3f}"
        )
        if "loop" in r:
            line += (
                f"; multi is {r['loop'] / r['multi']:.1f}x faster than the loop "
                f"(loop timed over {min(args.loop_adapters, args.adapters)} adapters, scaled)"
            )
        print(line, file=out)
    if args.memory_adapters:
        m = bench_memory(args, device)
        document["memory"] = {**m, "adapters": args.memory_adapters}
        print(
            f"memory: {args.memory_adapters} SmolLM2 adapters (rank {args.memory_rank}, "
            f"{m['modules']} modules): {m['added_bytes'] / 2**30:.3f} GiB resident added, "
            f"stacked R buffers {m['held_bytes'] / 2**30:.3f} GiB "
            f"(N x r x r x 4 bytes: {m['ideal_R_bytes'] / 2**30:.3f} GiB), "
            f"{m['added_bytes'] / args.memory_adapters / 1024:.1f} KiB per adapter)",
            file=out,
        )
    if args.json:
        print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
