"""LoRA-XS ablations on MiniLM (all-MiniLM-L6-v2) + BBC News topic classification (5 labels).

(1) LoRA-XS against PEFT LoRA at rank 8, on the same targets (query, value, attention output dense,
    intermediate dense: loraxs' BERT default) and each with a trained classifier head: test accuracy and
    trainable parameters side by side.
(2) The paper's Table 3 ablation: SVD factors against random frozen factors, at ranks 4 and 16 (and the
    rank of (1)). loraxs has no init option for random factors, so this script makes them: after the
    normal `prepare` (SVD factors injected), every XSLinear's A (r, n) and B (m, r) buffers are overwritten
    in place with the init nn.Linear gives its weight (kaiming_uniform_, a=sqrt(5): uniform with bound
    1/sqrt(fan_in)), as the paper's baseline does: A as a Linear(n -> r), B as a Linear(r -> m), drawn
    in sorted module order from one generator seeded with --seed. All else (R init, head, loop) is the same.

Same budget for every run: the same --steps optimizer steps of --batch examples, the same articles in the
same seeded order (loraxs_cli.train.step_indices), the same seed, linear schedule without warm-up, gradient
clipping at 1.0, no weight decay, head lr --head-lr, max length --max-length. LoRA-XS runs go through
loraxs' own train API (TrainConfig + train); PEFT LoRA (r = alpha = rank, no dropout) goes through a copy of
that loop built from the same loraxs helpers (data encoding, batch order, loss, scheduler, evaluation).

Learning rate: for each method, every lr of its grid is trained on the training articles minus
--val-per-label per label and scored on those held-back articles (never the test set); the best validation
accuracy (ties: lower validation loss) is then retrained on all training articles and scored on the test
set. The ablation (2) uses the lr chosen for LoRA-XS, for SVD and random factors alike.

    python benchmarks/ablation_minilm.py               # ~10-15 minutes on 2 CPU cores
    python benchmarks/ablation_minilm.py --quick --model DIR   # a few seconds on a tiny model (smoke tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]  # models_for_tests and bbc_data

TARGETS = ("query", "value", "attention.output.dense", "intermediate.dense")
TASK = "seq-cls"


# ----------------------------------------------------------------------------------------------
# Data


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def carve_validation(rows: list[dict], per_label: int) -> tuple[list[dict], list[dict]]:
    """Hold back the last `per_label` training articles of each label (in the seeded order) for validation."""
    seen: dict[str, int] = {}
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["label"]] = totals.get(row["label"], 0) + 1
    kept, held = [], []
    for row in rows:
        label = row["label"]
        seen[label] = seen.get(label, 0) + 1
        (held if seen[label] > totals[label] - per_label else kept).append(row)
    return kept, held


# ----------------------------------------------------------------------------------------------
# LoRA-XS through loraxs' train API


def random_kaiming_factors(model: torch.nn.Module, seed: int) -> int:
    """Overwrite every injected layer's frozen A and B with nn.Linear's default init; return the count."""
    from loraxs_cli.layer import xs_modules
    from loraxs_cli.models import backbone

    gen = torch.Generator().manual_seed(seed)
    layers = xs_modules(backbone(model))
    with torch.no_grad():
        for name in sorted(layers):
            layer = layers[name]
            for key in ("A", "B"):
                old = getattr(layer, key)
                # A is (out r, in n) and B (out m, in r): nn.Linear's own init for those shapes. A new
                # tensor, not copy_: the old buffer may be shared with the caller's factor tensors.
                fresh = torch.empty(old.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                setattr(layer, key, fresh.to(device=old.device, dtype=old.dtype))
    return len(layers)


@contextlib.contextmanager
def random_factors(seed: int):
    """While active, loraxs' `train` prepares its model as usual, then gets random frozen factors."""
    from loraxs_cli.train import recipe as train_module  # train() calls recipe.prepare

    original = train_module.prepare

    def prepare_then_randomize(config, dist, device, events):
        prepared = original(config, dist, device, events)
        random_kaiming_factors(prepared.model, seed)
        return prepared

    train_module.prepare = prepare_then_randomize
    try:
        yield
    finally:
        train_module.prepare = original


def run_loraxs(args, data: str, held: str, out: Path, *, rank: int, lr: float, init: str = "svd") -> dict:
    from loraxs_cli.train import TrainConfig, train

    config = TrainConfig(
        model=str(args.model), data=data, eval_data=held, out=str(out), task=TASK, method="xs", rank=rank,
        targets=",".join(TARGETS), max_length=args.max_length, batch_size=args.batch, max_steps=args.steps,
        lr=lr, head_lr=args.head_lr, warmup_ratio=0.0, save_every=0, log_every=args.steps, seed=args.seed,
    )  # fmt: skip
    started = time.perf_counter()
    with random_factors(args.seed) if init == "random" else contextlib.nullcontext():
        result = train(config)
    return {
        "accuracy": result.eval["accuracy"],
        "loss": result.eval["loss"],
        "trainable_params": result.trainable_params,
        "adapter_params": result.adapter_params,
        "seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------
# PEFT LoRA through a copy of loraxs' loop


def run_peft_lora(args, data: str, held: str, *, rank: int, lr: float) -> dict:
    from peft import LoraConfig, get_peft_model

    from loraxs_cli import data as datamod
    from loraxs_cli.evaluate import evaluate_examples, loss_sum, model_inputs
    from loraxs_cli.models import backbone, head_kwargs, load_model, load_tokenizer, resolve_model
    from loraxs_cli.train import TrainConfig, make_scheduler, step_indices

    started = time.perf_counter()
    resolved = resolve_model(str(args.model))
    rows, held_rows = datamod.read_rows(data), datamod.read_rows(held)
    labels = datamod.label_names(rows, TASK)
    tokenizer = load_tokenizer(resolved)
    train_examples = datamod.encode(rows, tokenizer, TASK, max_length=args.max_length, labels=labels)
    held_examples = datamod.encode(held_rows, tokenizer, TASK, max_length=args.max_length, labels=labels)

    torch.manual_seed(args.seed)  # the head starts where loraxs' train starts it
    model = load_model(resolved, **head_kwargs(TASK, labels))
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    core_ids = {id(p) for p in backbone(model).parameters()}
    head = [p for p in model.parameters() if id(p) not in core_ids]
    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS))
    peft_model = get_peft_model(model, lora)
    adapter = [p for p in peft_model.parameters() if p.requires_grad]
    for p in head:
        p.requires_grad_(True)
    trainable = adapter + head

    settings = TrainConfig(model="", data="", out="", lr=lr, head_lr=args.head_lr, max_steps=args.steps)
    optimizer = torch.optim.AdamW(
        [
            {"params": adapter, "lr": lr, "weight_decay": 0.0},
            {"params": head, "lr": args.head_lr, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    scheduler = make_scheduler(optimizer, settings, args.steps)
    pad_id = datamod.pad_id_of(tokenizer)
    peft_model.train()
    for step in range(args.steps):
        chosen = [train_examples[i] for i in step_indices(step, len(train_examples), args.batch, args.seed)]
        batch = datamod.collate(chosen, pad_id, TASK)
        logits = peft_model(**model_inputs(batch, "cpu")).logits
        summed, terms = loss_sum(logits, batch["labels"], TASK)
        (summed / max(terms, 1)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    scores = evaluate_examples(peft_model, held_examples, TASK, batch_size=args.batch, pad_id=pad_id)
    return {
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
        "trainable_params": sum(p.numel() for p in trainable),
        "adapter_params": sum(p.numel() for p in adapter),
        "seconds": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------------------------
# The study


def choose_lr(method: str, grid: list[float], run, log) -> tuple[float, list[dict]]:
    """Best validation accuracy over the grid (ties: lower validation loss); one lr needs no runs."""
    if len(grid) == 1:
        return grid[0], []
    tried = []
    for lr in grid:
        scores = run(lr)
        tried.append({"method": method, "lr": lr, **scores})
        log(f"  {method} lr {lr:g}: validation accuracy {scores['accuracy']:.3f}, loss {scores['loss']:.3f}")
    best = max(tried, key=lambda t: (t["accuracy"], -t["loss"]))
    return best["lr"], tried


def study(args, root: Path, log) -> dict:
    from models_for_tests import bbc_split

    train_rows, test_rows = bbc_split(args.train_per_label, args.test_per_label, seed=args.seed)
    fit_rows, val_rows = carve_validation(train_rows, args.val_per_label)
    files = {
        name: write_jsonl(root / f"{name}.jsonl", rows)
        for name, rows in (("train", train_rows), ("test", test_rows), ("fit", fit_rows), ("val", val_rows))
    }
    runs = iter(range(1_000_000))

    def xs(data, held, rank, lr, init="svd"):
        return run_loraxs(
            args, files[data], files[held], root / f"run-{next(runs)}", rank=rank, lr=lr, init=init
        )

    def peft(data, held, rank, lr):
        return run_peft_lora(args, files[data], files[held], rank=rank, lr=lr)

    log(f"choosing lr on {len(fit_rows)} training / {len(val_rows)} validation articles")
    xs_lr, xs_tried = choose_lr("loraxs", args.xs_lrs, lambda lr: xs("fit", "val", args.rank, lr), log)
    lora_lr, lora_tried = choose_lr("lora", args.lora_lrs, lambda lr: peft("fit", "val", args.rank, lr), log)

    log(f"training on {len(train_rows)} articles, testing on {len(test_rows)}")
    comparison = [
        {"method": "loraxs", "rank": args.rank, "lr": xs_lr, **xs("train", "test", args.rank, xs_lr)},
        {"method": "lora", "rank": args.rank, "lr": lora_lr, **peft("train", "test", args.rank, lora_lr)},
    ]
    log("  " + ", ".join(f"{r['method']} accuracy {r['accuracy']:.3f}" for r in comparison))
    ablation = []
    for rank in sorted(set(args.ablation_ranks) | {args.rank}):
        for init in ("svd", "random"):
            if rank == args.rank and init == "svd":
                scores = {k: v for k, v in comparison[0].items() if k not in ("method", "rank", "lr")}
            else:
                scores = xs("train", "test", rank, xs_lr, init)
            ablation.append({"rank": rank, "init": init, "lr": xs_lr, **scores})
            log(f"  rank {rank} {init}: accuracy {scores['accuracy']:.3f}")
    return {
        "data": {
            "train": len(train_rows),
            "test": len(test_rows),
            "fit": len(fit_rows),
            "val": len(val_rows),
        },
        "lr_choice": xs_tried + lora_tried,
        "comparison": comparison,
        "ablation": ablation,
    }


def print_report(result: dict, args, out) -> None:
    print(
        f"MiniLM {args.model}; BBC {result['data']['train']} train / {result['data']['test']} test articles; "
        f"{args.steps} steps x {args.batch}, max length {args.max_length}, head lr {args.head_lr:g}, "
        f"seed {args.seed}",
        file=out,
    )
    if result["lr_choice"]:
        print(
            f"\nlr choice ({result['data']['fit']} train / {result['data']['val']} validation articles)",
            file=out,
        )
        print(f"{'method':8}{'lr':>9}{'val acc':>9}{'val loss':>10}", file=out)
        for t in result["lr_choice"]:
            print(f"{t['method']:8}{t['lr']:>9g}{t['accuracy']:>9.3f}{t['loss']:>10.3f}", file=out)
    print("\n(1) LoRA-XS vs PEFT LoRA, same targets, trained classifier head in both", file=out)
    print(f"{'method':8}{'rank':>5}{'lr':>9}{'trainable':>11}{'adapter':>10}{'test acc':>10}{'test loss':>11}"
          f"{'wall s':>9}", file=out)  # fmt: skip
    for r in result["comparison"]:
        print(f"{r['method']:8}{r['rank']:>5}{r['lr']:>9g}{r['trainable_params']:>11,}{r['adapter_params']:>10,}"
              f"{r['accuracy']:>10.3f}{r['loss']:>11.3f}{r['seconds']:>9.0f}", file=out)  # fmt: skip
    print(
        "wall s: the whole run (LoRA-XS includes fingerprint, SVD, saving); not a speed comparison", file=out
    )
    xs, lora = result["comparison"]
    print(f"loraxs / lora: trainable parameters {xs['trainable_params'] / lora['trainable_params']:.4f}x, "
          f"accuracy {xs['accuracy'] - lora['accuracy']:+.3f}", file=out)  # fmt: skip
    print("\n(2) frozen factors: SVD vs random (kaiming-uniform), LoRA-XS lr", file=out)
    print(f"{'rank':>4}{'init':>8}{'trainable':>11}{'test acc':>10}{'test loss':>11}", file=out)
    for r in result["ablation"]:
        print(f"{r['rank']:>4}{r['init']:>8}{r['trainable_params']:>11,}{r['accuracy']:>10.3f}{r['loss']:>11.3f}",
              file=out)  # fmt: skip


QUICK = dict(train_per_label=4, test_per_label=2, val_per_label=1, steps=2, batch=4, max_length=32,
             xs_lrs=[1e-2], lora_lrs=[1e-3])  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="BERT-like model dir (default: MiniLM wheel)"
    )
    parser.add_argument("--train-per-label", type=int, default=40)
    parser.add_argument("--test-per-label", type=int, default=20)
    parser.add_argument(
        "--val-per-label", type=int, default=10, help="held back from train for the lr choice"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ablation-ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--head-lr", type=float, default=5e-3)
    parser.add_argument("--xs-lrs", type=float, nargs="+", default=[1e-2, 3e-3], help="LoRA-XS lr grid")
    parser.add_argument("--lora-lrs", type=float, nargs="+", default=[2e-3, 5e-4], help="PEFT LoRA lr grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="4/2 articles per label, 2 steps, one lr each")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout (tables on stderr)")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = parser.parse_args([])
        for name, value in QUICK.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    if args.model is None:
        from models_for_tests import minilm_dir

        args.model = minilm_dir()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = sys.stderr if args.json else sys.stdout
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ablation-minilm-") as tmp:
        os.environ["LORAXS_HOME"] = str(Path(tmp) / "loraxs-home")  # a private factor cache
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from loraxs_cli.models import quiet_transformers

        quiet_transformers()
        result = study(args, Path(tmp), lambda text: print(text, file=out, flush=True))
    result["seconds"] = time.perf_counter() - started
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print_report(result, args, out)
    print(f"\ntotal {result['seconds']:.0f} s, threads {torch.get_num_threads()}", file=out)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
