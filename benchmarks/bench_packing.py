"""Packed against padded against length-grouped batches: tokens/s of LoRA-XS training on real text.

SmolLM2-135M-Instruct (real weights, float32) with LoRA-XS R matrices on its 7 projections trains on the
same BBC News examples three ways, one pass each, so each variant sees the same real tokens:

    padded    batches of --batch-size examples in the run's seeded order, padded to the longest
    grouped   the same batches in --group-by-length's order (schedule.step_indices with lengths)
    packed    --packing: the examples in rows of --max-length tokens (packing.pack), --batch-size rows a batch

Every step is the training loop's own: recipe.Passes.forward_backward (collate, the model, the loss) and
AdamW on R, at lr 0 so that R stays put and the three mean losses must agree (checked: packing changes
the layout, never the loss). tokens/s counts real tokens only. The steps of the three variants are
interleaved in proportion to their number (each variant's step k of n at (k + 1/2) / n of the way), so
that other load on the machine hits them alike; one untimed step of each comes first. The examples are
BBC paragraphs (--pieces paragraphs: each paragraph of the articles a text row, as `loraxs train --data
bbc.txt` reads blank-line separated text) or whole articles (--pieces articles: cut into --max-length
blocks as {"text"} rows are, so most blocks are full).

    OMP_NUM_THREADS=1 python benchmarks/bench_packing.py             # 64 paragraphs, max-length 256, batch 4
    python benchmarks/bench_packing.py --pieces articles --max-length 512
    python benchmarks/bench_packing.py --quick                       # a tiny random Llama (smoke test)

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("padded", "grouped", "packed")
TARGET = 1.5  # packed tokens/s over padded


def bbc_rows(pieces: str, seed: int) -> list[dict]:
    """{"text"} rows of BBC News: the paragraphs of the articles, or the articles, in a seeded order."""
    from bbc_data import bbc_root

    paths = sorted(bbc_root().glob("*/*.txt"))
    random.Random(seed).shuffle(paths)
    rows = []
    for path in paths[:400]:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts = [p for p in text.split("\n\n") if p.strip()] if pieces == "paragraphs" else [text]
        rows += [{"text": " ".join(part.split())} for part in parts]
    return rows


def load(args):
    """(model, tokenizer) with the XS factors of PROJECTIONS injected (R trainable)."""
    import torch

    from loraxs_cli.factors import SVDSettings, compute_xs_factors
    from loraxs_cli.layer import inject
    from loraxs_cli.models import backbone

    if args.quick:
        from models_for_tests import chatml_tokenizer, tiny_llama

        model, tokenizer = tiny_llama(vocab_size=1024), chatml_tokenizer(vocab_size=1024)  # small: quick
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from models_for_tests import smollm2_dir

        model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    core = backbone(model)
    names = [n for n, _ in core.named_modules() if n.rpartition(".")[2] in PROJECTIONS]
    found = compute_xs_factors(core, names, args.rank, SVDSettings(niter=2), device=torch.device("cpu"))
    inject(core, {n: (found.tensors[f"{n}.A"], found.tensors[f"{n}.B"]) for n in names}, scaling=1.0)
    return model.train(), tokenizer


def batches(args, examples: list) -> dict[str, list[list]]:
    """Each variant's batches over the same examples (one pass)."""
    from loraxs_cli.packing import pack
    from loraxs_cli.train.schedule import step_indices

    def epoch(items: list, **grouping) -> list[list]:
        steps = math.ceil(len(items) / args.batch_size)
        order = [step_indices(s, len(items), args.batch_size, args.seed, **grouping) for s in range(steps)]
        return [[items[i] for i in indices] for indices in order]

    lengths = tuple(len(e.input_ids) for e in examples)
    return {
        "padded": epoch(examples),
        "grouped": epoch(examples, lengths=lengths, group=args.batch_size),
        "packed": epoch(list(pack(examples, args.max_length))),
    }


def measure(args, model, tokenizer, plan: dict[str, list[list]]) -> dict[str, dict]:
    import torch

    from loraxs_cli.data import pad_id_of
    from loraxs_cli.layer import xs_modules
    from loraxs_cli.models import backbone
    from loraxs_cli.train.distributed import Dist
    from loraxs_cli.train.recipe import Passes

    passes = Passes(
        "causal-lm", args.batch_size, 1, Dist(), torch.device("cpu"), None, None, pad_id_of(tokenizer)
    )
    params = [m.R for m in xs_modules(backbone(model)).values()]
    optimizer = torch.optim.AdamW(params, lr=0.0)  # every step's work, and R unchanged: equal losses

    def step(examples: list) -> tuple[float, float, int, int]:
        begin = time.perf_counter()
        loss, tokens, terms = passes.forward_backward(model, examples)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin, loss, int(tokens), terms

    for name in VARIANTS:  # warm-up, untimed
        step(plan[name][0])
    rows = {
        n: {"steps": len(plan[n]), "seconds": 0.0, "loss": 0.0, "tokens": 0, "terms": 0} for n in VARIANTS
    }
    # Interleaved in proportion: step k of n at (k + 1/2) / n of the way, so that a variant with fewer
    # steps (packed) does not finish early and leave the others alone with whatever load comes later.
    order = sorted(
        ((k + 0.5) / len(plan[n]), i, k) for i, n in enumerate(VARIANTS) for k in range(len(plan[n]))
    )
    for _, i, k in order:
        name = VARIANTS[i]
        seconds, loss, tokens, terms = step(plan[name][k])
        row = rows[name]
        row["seconds"] += seconds
        row["loss"] += loss
        row["tokens"] += tokens
        row["terms"] += terms
        print(f"  {name} step {k + 1}/{len(plan[name])}: {seconds:.1f} s", file=sys.stderr)
    for name, row in rows.items():
        computed = sum(len(b) * max(len(e.input_ids) for e in b) for b in plan[name])
        row.update(
            variant=name,
            rows=sum(len(b) for b in plan[name]),
            computed_tokens=computed,
            real_share=row["tokens"] / computed,
            tokens_per_s=row["tokens"] / row["seconds"],
            mean_loss=row.pop("loss") / max(row["terms"], 1),
        )
    for row in rows.values():
        row["vs_padded"] = row["tokens_per_s"] / rows["padded"]["tokens_per_s"]
    return rows


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'variant':9}{'steps':>6}{'rows':>6}{'real tokens':>12}{'computed':>10}{'real share':>11}"
          f"{'seconds':>9}{'tokens/s':>10}{'vs padded':>10}{'mean loss':>11}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:9}{r['steps']:>6}{r['rows']:>6}{r['tokens']:>12,}{r['computed_tokens']:>10,}"
              f"{r['real_share']:>11.3f}{r['seconds']:>9.1f}{r['tokens_per_s']:>10,.1f}{r['vs_padded']:>10.3f}"
              f"{r['mean_loss']:>11.5f}")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pieces", choices=["paragraphs", "articles"], default="paragraphs")
    parser.add_argument(
        "--examples", type=int, default=None, help="examples of the pass (default 64; quick 16)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default 256; quick 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama and its own tokenizer")
    args = parser.parse_args(argv)
    args.examples = args.examples or (16 if args.quick else 64)
    args.max_length = args.max_length or (64 if args.quick else 256)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(ROOT)]  # models_for_tests, bbc_data
    import torch

    torch.set_num_threads(args.threads)
    from loraxs_cli.data import Row, encode

    model, tokenizer = load(args)
    examples = []
    for i, row in enumerate(bbc_rows(args.pieces, args.seed)):  # encoded until there are enough
        examples += encode([Row(row, f"bbc:{i}")], tokenizer, "causal-lm", max_length=args.max_length)
        if len(examples) >= args.examples:
            break
    examples = examples[: args.examples]
    lengths = sorted(len(e.input_ids) for e in examples)
    print(f"{'tiny random Llama' if args.quick else 'SmolLM2-135M-Instruct'}, LoRA-XS rank {args.rank} on "
          f"{', '.join(PROJECTIONS)}; {len(examples)} BBC {args.pieces} of {lengths[0]}-{lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]}), max-length {args.max_length}, batch {args.batch_size}, "
          f"{args.threads} thread(s), attention {model.config._attn_implementation}")  # fmt: skip
    found = measure(args, model, tokenizer, batches(args, examples))
    print_table(found)
    losses = [r["mean_loss"] for r in found.values()]
    spread = (max(losses) - min(losses)) / abs(losses[0])
    print(f"mean loss equal across the variants (same loss terms): relative spread {spread:.1e}")
    ratio = found["packed"]["vs_padded"]
    print(
        f"target packed >= {TARGET}x padded tokens/s: {ratio:.2f}x, {'met' if ratio >= TARGET else 'NOT met'}"
    )
    names = ("pieces", "examples", "max_length", "batch_size", "rank", "layers", "threads", "seed", "quick")
    settings = {k: getattr(args, k) for k in names}
    ratios = {"packed_vs_padded": ratio, "grouped_vs_padded": found["grouped"]["vs_padded"]}
    document = {"settings": settings, "rows": list(found.values()), "ratios": ratios, "loss_spread": spread}
    print(json.dumps(document))


if __name__ == "__main__":
    main()
