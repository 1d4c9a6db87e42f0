"""The sweep behind `loraxs train`'s default learning rates, warmup and batch size (README "Defaults").

Four real tasks, each short (the length of run our users run, not the papers' 10-50 epochs), each scored
on held-out rows that are never trained on:

    binary     MiniLM, seq-cls: BBC "politics" against "business", 1:2 (majority class 0.667)
    bbc5       MiniLM, seq-cls: BBC's 5 topics, balanced (chance 0.2)
    quickstart bbc5 as scripts/quickstart.sh runs it: 40 articles per topic, rank 8, batch 16, 60 steps
    smol-text  SmolLM2-135M-Instruct, causal-lm on BBC article text: held-out perplexity
    word       SmolLM2-135M-Instruct, causal-lm chats of one-step word problems: exact match by generation

Phases (run in this order; every finished run is one JSON line in --out/results.jsonl, and a rerun skips
the runs already there, so a killed sweep continues where it stopped):

    grid    R's lr x the head's lr (seq-cls) or R's lr (causal-lm), no warmup, the base batch; if the best
            lr is at the grid's edge the grid grows one step past it
    refine  at each task's best: warmup 0.1; batch 16 and head lr 2e-2 (bbc5); another seed and LoRA-SB
            (--method sb) at two lrs (binary); LoRA-SB at two lrs (word)
    check   candidate defaults on every classification task: R at 3e-3, 5e-3, 1e-2 with the head at 2e-2
    auto    `--lr auto` (the LR range test) at the task's settings: its choice and the metric it reaches
    base    the untrained base model's metric (causal-lm tasks)
    report  --out/table.md from results.jsonl (also written after every run)

    OMP_NUM_THREADS=2 python benchmarks/sweep_defaults.py --out /tmp/sweep            # all phases
    python benchmarks/sweep_defaults.py --out /tmp/sweep --phase report      # the table from results.jsonl
    python benchmarks/sweep_defaults.py --quick --out /tmp/q --minilm DIR --smollm2 DIR   # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]  # models_for_tests and bbc_data

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
HEAD_GRID = (5e-3, 2e-2)
AUTO_HEAD_LR = 2e-2  # the seq-cls default head lr (the grid's best on both MiniLM tasks)
OLD_DEFAULT = {"lr": 1e-3, "head_lr": 1e-3}  # the defaults before the sweep (the head's lr was lr)


@dataclass(frozen=True)
class Task:
    name: str
    model: str  # "minilm" or "smollm2"
    task: str
    metric: str  # higher is better except perplexity
    steps: int
    max_length: int
    batch_size: int = 8
    lrs: tuple = LR_GRID
    head_lrs: tuple = ()
    description: str = ""
    rank: int = 16


@dataclass(frozen=True)
class Setting:
    task: str
    lr: float | str
    head_lr: float | None = None
    warmup_ratio: float = 0.0
    batch_size: int | None = None  # None: the task's
    method: str = "xs"
    seed: int = 0
    phase: str = "grid"

    def key(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "phase"}, sort_keys=True)


@dataclass
class Prepared:
    train: str
    held: str
    majority: float | None = None
    extra: dict = field(default_factory=dict)


# Sized for a shared 2-core CPU: short texts (64 tokens of each article) and few steps.
TASKS = {
    "binary": Task("binary", "minilm", "seq-cls", "accuracy", 100, 64, head_lrs=HEAD_GRID,
                   description="BBC politics vs business (1:2), MiniLM"),
    "bbc5": Task("bbc5", "minilm", "seq-cls", "accuracy", 100, 64, lrs=(3e-3, 1e-2, 3e-2),
                 head_lrs=(5e-3,), description="BBC 5 topics, MiniLM"),
    "quickstart": Task("quickstart", "minilm", "seq-cls", "accuracy", 60, 128, batch_size=16, rank=8,
                       lrs=(3e-3, 1e-2), head_lrs=(5e-3, 2e-2),
                       description="scripts/quickstart.sh: BBC 5 topics, 40 per topic, rank 8, MiniLM"),
    "smol-text": Task("smol-text", "smollm2", "causal-lm", "perplexity", 30, 64,
                      description="BBC article text, SmolLM2-135M"),
    "word": Task("word", "smollm2", "causal-lm", "exact_match", 30, 96,
                 description="word problems (chat), SmolLM2-135M-Instruct"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Data


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def binary_split(per_minority: int, held_minority: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """BBC politics (minority) against business (twice as many), seeded; disjoint train and held-out rows."""
    from bbc_data import bbc_examples

    rows = bbc_examples(seed)
    politics = [r for r in rows if r["label"] == "politics"]
    business = [r for r in rows if r["label"] == "business"]
    train = politics[:per_minority] + business[: 2 * per_minority]
    held = politics[per_minority : per_minority + held_minority]
    held += business[2 * per_minority : 2 * per_minority + 2 * held_minority]
    random.Random(seed + 1).shuffle(train)
    return train, held


def word_problem(rng: random.Random) -> dict:
    """The word problems of tests/test_real_train.py."""
    from test_real_train import word_problem as make

    return make(rng)


def build_data(task: Task, out: Path, quick: bool) -> Prepared:
    from bbc_data import bbc_split

    data = out / "data" / task.name
    if task.name == "binary":
        train, held = binary_split(*((4, 2) if quick else (100, 30)))
        majority = sum(r["label"] == "business" for r in held) / len(held)
        return Prepared(
            write_jsonl(data / "train.jsonl", train), write_jsonl(data / "held.jsonl", held), majority
        )
    if task.name in ("bbc5", "quickstart"):
        train, held = bbc_split(*((2, 1) if quick else (80, 20) if task.name == "bbc5" else (40, 20)))
        return Prepared(write_jsonl(data / "train.jsonl", train), write_jsonl(data / "held.jsonl", held), 0.2)
    if task.name == "smol-text":
        train, held = bbc_split(*((1, 1) if quick else (16, 4)))
        strip = lambda rows: [{"text": r["text"]} for r in rows]  # noqa: E731
        return Prepared(
            write_jsonl(data / "train.jsonl", strip(train)), write_jsonl(data / "held.jsonl", strip(held))
        )
    rng = random.Random(0)
    train = [word_problem(rng) for _ in range(8 if quick else 320)]
    held = [word_problem(rng) for _ in range(4 if quick else 48)]
    return Prepared(write_jsonl(data / "train.jsonl", train), write_jsonl(data / "held.jsonl", held))


# ----------------------------------------------------------------------------------------------
# One run


def run_one(args, task: Task, prepared: Prepared, setting: Setting) -> dict:
    from loraxs_cli.evaluate import EvalRequest, run_eval
    from loraxs_cli.train import TrainConfig, train

    model = args.minilm if task.model == "minilm" else args.smollm2
    steps = 2 if args.quick else task.steps
    if setting.phase == "base":
        return run_base(task, prepared, model)
    work = Path(tempfile.mkdtemp(prefix=f"sweep-{task.name}-"))
    config = TrainConfig(
        model=str(model), data=prepared.train, eval_data=prepared.held, out=str(work / "run"), task=task.task,
        method=setting.method, rank=task.rank, max_length=task.max_length,
        batch_size=setting.batch_size or task.batch_size, lr=setting.lr, head_lr=setting.head_lr,
        warmup_ratio=setting.warmup_ratio, max_steps=steps, eval_every=max(1, steps // 2), save_every=0,
        log_every=max(1, steps // 10), seed=setting.seed,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        result = train(config)
    except Exception as error:  # a diverged run is a result too
        shutil.rmtree(work, ignore_errors=True)
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], **{k: r["eval"][k] for k in ("loss", task.metric) if k in r["eval"]}}
             for r in rows if "eval" in r]  # fmt: skip
    lr_find = next((r["lr_find"] for r in rows if "lr_find" in r), None)
    record = {
        "steps": steps,
        "eval": result.eval,
        "curve": curve,
        "train_loss": result.final_loss,
        "resolved": {
            k: v for k, v in _resolved(result.run_dir).items() if k in ("lr", "head_lr", "warmup_ratio")
        },
    }
    if lr_find:
        record["lr_find"] = {k: v for k, v in lr_find.items() if k != "curve"}
    if task.metric == "exact_match":
        request = EvalRequest(model=str(model), data=prepared.held, adapters=[str(result.adapter_dir)],
                              generate=True, max_new_tokens=24, batch_size=16)  # fmt: skip
        record["eval"] = {**result.eval, **run_eval(request)[0]}
    record["metric"] = record["eval"][task.metric]
    record["seconds"] = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    return record


def run_base(task: Task, prepared: Prepared, model: Path) -> dict:
    from loraxs_cli.evaluate import EvalRequest, run_eval

    started = time.perf_counter()
    generate = task.metric == "exact_match"
    request = EvalRequest(model=str(model), data=prepared.held, task=task.task, max_length=task.max_length,
                          generate=generate, max_new_tokens=24, batch_size=16)  # fmt: skip
    scores = run_eval(request)[0]
    if generate:  # the loss too, as the trained runs report it
        scores = {**run_eval(replace(request, generate=False))[0], **scores}
    return {
        "steps": 0,
        "eval": scores,
        "metric": scores[task.metric],
        "seconds": time.perf_counter() - started,
    }


def _resolved(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


# ----------------------------------------------------------------------------------------------
# Phases


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def better(task: Task, a: float, b: float) -> bool:
    if math.isnan(a):
        return False
    return a < b if task.metric == "perplexity" else a > b


def best_of(task: Task, results: list[dict], phase: str = "grid", method: str = "xs") -> dict | None:
    """The best finished run of a task (ties: the lower held-out loss)."""
    done = [r for r in results if r["setting"]["task"] == task.name and r["setting"]["phase"] == phase
            and r["setting"]["method"] == method and "metric" in r]  # fmt: skip
    if not done:
        return None
    sign = -1 if task.metric == "perplexity" else 1
    return max(done, key=lambda r: (sign * r["metric"], -r["eval"]["loss"]))


def grid_settings(task: Task, results: list[dict]) -> list[Setting]:
    lrs = list(task.lrs)
    heads = list(task.head_lrs) or [None]
    settings = [Setting(task.name, lr, head) for lr in lrs for head in heads]
    old = Setting(task.name, **OLD_DEFAULT)
    if task.task != "causal-lm" and old not in settings:
        settings.insert(0, old)  # the defaults the issue reported
    best = best_of(task, results)
    if best is not None:  # grow the grid past an edge where the best sits
        lr = best["setting"]["lr"]
        factor = math.sqrt(10)
        grown = max(lrs) * factor if lr >= max(lrs) else min(lrs) / factor if lr <= min(lrs) else None
        if grown is not None:
            settings += [Setting(task.name, float(f"{grown:.1g}"), best["setting"]["head_lr"])]
    return settings


def refine_settings(task: Task, results: list[dict]) -> list[Setting]:
    best = best_of(task, results)
    if best is None:
        return []
    b = Setting(**{**best["setting"], "phase": "refine"})
    settings = [replace(b, warmup_ratio=0.1)]
    if task.name == "binary":  # the noisiest task: another seed, and LoRA-SB
        settings.append(replace(b, seed=1))
        settings += [replace(b, method="sb", lr=lr) for lr in (1e-3, 1e-2)]
    if task.name == "bbc5":
        settings.append(replace(b, batch_size=16))
        settings.append(replace(b, head_lr=2e-2))  # the head lr binary's grid also tried
    if task.name == "word":  # LoRA-SB on a causal LM
        settings += [replace(b, method="sb", lr=lr) for lr in (3e-3, 1e-2)]
    return settings


def auto_settings(task: Task, results: list[dict]) -> list[Setting]:
    """`--lr auto` as a user runs it: the head at the seq-cls default lr."""
    return [Setting(task.name, "auto", AUTO_HEAD_LR if task.task == "seq-cls" else None, phase="auto")]


def base_settings(task: Task, results: list[dict]) -> list[Setting]:
    """The base model before training (causal-lm: a head-less model has a metric of its own)."""
    return [Setting(task.name, 0.0, phase="base")] if task.task == "causal-lm" else []


def check_settings(task: Task, results: list[dict]) -> list[Setting]:
    """Candidate defaults on every classification task (the head at 2e-2): R at 3e-3, 5e-3 and 1e-2."""
    if task.task != "seq-cls":
        return []
    return [Setting(task.name, lr, 2e-2, phase="check") for lr in (3e-3, 5e-3, 1e-2)]


PHASES = {
    "grid": grid_settings,
    "refine": refine_settings,
    "check": check_settings,
    "auto": auto_settings,
    "base": base_settings,
}


def run_phase(args, phase: str, tasks: list[Task], prepared: dict[str, Prepared]) -> None:
    path = args.out / "results.jsonl"
    for task in tasks:
        while True:  # the grid may grow after a run: recompute what remains
            results = load_results(path)
            done = {json.dumps({k: v for k, v in r["setting"].items() if k != "phase"}, sort_keys=True)
                    for r in results}  # fmt: skip
            todo = [s for s in PHASES[phase](task, results) if s.key() not in done]
            if not todo:
                break
            setting = todo[0]
            print(f"[{time.strftime('%H:%M:%S')}] {phase} {setting}", file=sys.stderr, flush=True)
            record = run_one(args, task, prepared[task.name], setting)
            row = {"setting": asdict(setting), "metric_name": task.metric, **record}
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            shown = record.get("metric", record.get("error"))
            print(f"    -> {task.metric} {shown} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
            write_report(args.out, tasks, prepared)


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if value >= 0.1:
        return f"{value:g}"
    mantissa, exponent = f"{value:.1e}".split("e")  # 3e-3, 4.5e-3
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _score(task: Task, row: dict, loss: bool = False) -> str:
    """The metric (and with `loss` the held-out loss, which separates runs tied on accuracy)."""
    if "metric" not in row:
        return "diverged" if "Diverged" in row.get("error", "") else "error"
    text = f"{row['metric']:.2f}" if task.metric == "perplexity" else f"{row['metric']:.3f}"
    return f"{text} ({row['eval']['loss']:.3f})" if loss else text


STEEPEST_FILE = "results-steepest.jsonl"  # --lr auto runs of the first rule (steepest descent), kept apart


def write_report(out: Path, tasks: list[Task], prepared: dict[str, Prepared]) -> None:
    results = load_results(out / "results.jsonl")
    for row in load_results(out / STEEPEST_FILE):
        results.append({**row, "setting": {**row["setting"], "phase": "auto-steepest"}})
    intro = (
        "Held-out metric after a short run (rank 16, LoRA-XS unless noted; linear decay, clipping 1.0, "
        "seed 0). Rows: R's lr; columns: the head's lr (seq-cls), cells: accuracy (held-out loss)."
    )
    lines = ["# Defaults sweep", "", intro, ""]
    for task in tasks:
        rows = [r for r in results if r["setting"]["task"] == task.name]
        if not rows:
            continue
        base = prepared[task.name].majority
        steps = rows[0].get("steps") or task.steps
        shape = f"{steps} steps of batch {task.batch_size}, max length {task.max_length}, rank {task.rank}"
        majority = f"; majority class {base:.3f}" if base else ""
        lines += [f"## {task.name}: {task.description}", "",
                  f"{task.metric} on the held-out rows after {shape}{majority}.", ""]  # fmt: skip
        grid = [r for r in rows if r["setting"]["phase"] == "grid"]
        heads = sorted({r["setting"]["head_lr"] for r in grid}, key=lambda h: -1 if h is None else h)
        if task.task == "seq-cls":
            lines.append(
                "| R lr \\ head lr | " + " | ".join("= R lr" if h is None else _fmt(h) for h in heads) + " |"
            )
            lines.append("|---" * (len(heads) + 1) + "|")
            for lr in sorted({r["setting"]["lr"] for r in grid}):
                cells = []
                for head in heads:
                    found = [r for r in grid if r["setting"]["lr"] == lr and r["setting"]["head_lr"] == head]
                    cells.append(_score(task, found[0], loss=True) if found else "")
                lines.append(f"| {_fmt(lr)} | " + " | ".join(cells) + " |")
        else:
            lines += ["| R lr | " + task.metric + " | held-out loss |", "|---|---|---|"]
            for r in sorted(grid, key=lambda r: r["setting"]["lr"]):
                loss = f"{r['eval']['loss']:.3f}" if "eval" in r else "-"
                lines.append(f"| {_fmt(r['setting']['lr'])} | {_score(task, r)} | {loss} |")
        other = [r for r in rows if r["setting"]["phase"] != "grid"]
        if other:
            lines += ["", "| variant | lr | head lr | warmup | batch | seed | " + task.metric + " (loss) |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in other:
                s = r["setting"]
                lr = s["lr"]
                if lr == "auto" and "lr_find" in r:
                    lr = f"auto -> {_fmt(r['lr_find']['lr'])}"
                name = f"{s['phase']} {s['method']}"
                batch = s["batch_size"] or task.batch_size
                cells = [name, _fmt(lr), _fmt(s["head_lr"]), f"{s['warmup_ratio']:g}", str(batch),
                         str(s["seed"]), _score(task, r, loss=True)]  # fmt: skip
                if s["phase"] == "base":
                    cells = ["base model, untrained", "-", "-", "-", "-", "-", cells[-1]]
                lines.append("| " + " | ".join(cells) + " |")
        best = best_of(task, results)
        if best:
            s = best["setting"]
            lines += ["", f"Best of the grid: lr {_fmt(s['lr'])}, head lr {_fmt(s['head_lr'])}: "
                      f"{task.metric} {_score(task, best)}."]  # fmt: skip
        lines.append("")
    lines += auto_summary(tasks, results)
    (out / "table.md").write_text("\n".join(lines))


def auto_summary(tasks: list[Task], results: list[dict]) -> list[str]:
    """`--lr auto` against the sweep: each rule's rate from the same range test, the rate the sweep found
    best (any head lr), and the metric of training at the chosen rate."""
    lines = ["## --lr auto against the swept best", "",
             "| task | swept best R lr (metric) | auto: valley, chosen (metric) | steepest | min/10 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for task in tasks:
        mine = [r for r in results if r["setting"]["task"] == task.name]
        swept = [r for r in mine if "metric" in r and r["setting"]["phase"] in ("grid", "refine", "check")
                 and r["setting"]["method"] == "xs"]  # fmt: skip
        auto = [r for r in mine if r["setting"]["phase"] == "auto" and "lr_find" in r]
        if not swept or not auto:
            continue
        sign = -1 if task.metric == "perplexity" else 1
        best = max(swept, key=lambda r: (sign * r["metric"], -r["eval"]["loss"]))
        found = auto[-1]["lr_find"].get("suggestions", {})
        steep = [
            r
            for r in results
            if r["setting"]["task"] == task.name and r["setting"]["phase"] == "auto-steepest"
        ]
        steepest = _fmt(found.get("steepest")) if found.get("steepest") else "-"
        if steep:
            steepest = f"{_fmt(steep[-1]['lr_find']['lr'])} ({_score(task, steep[-1])}, first version)"
        lines.append(f"| {task.name} | {_fmt(best['setting']['lr'])} ({_score(task, best)}) | "
                     f"{_fmt(auto[-1]['lr_find']['lr'])} ({_score(task, auto[-1])}) | {steepest} | "
                     f"{_fmt(found.get('min/10'))} |")  # fmt: skip
    return [*lines, ""]


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="results.jsonl, table.md and the data files")
    parser.add_argument("--phase", choices=["all", *PHASES, "report"], default="all")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument(
        "--minilm", type=Path, default=None, help="MiniLM directory (default: the test wheel's)"
    )
    parser.add_argument(
        "--smollm2", type=Path, default=None, help="SmolLM2 directory (default: the test copy)"
    )
    parser.add_argument("--quick", action="store_true", help="a few rows, 2 steps per run (smoke test)")
    args = parser.parse_args()
    if args.quick and (args.minilm is None or args.smollm2 is None):
        parser.error("--quick needs --minilm and --smollm2 (tiny models)")
    from models_for_tests import minilm_dir, smollm2_dir

    args.minilm = args.minilm or minilm_dir()
    args.smollm2 = args.smollm2 or smollm2_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LORAXS_HOME", str(args.out / "home"))  # the sweep's own factor cache
    tasks = [TASKS[name] for name in args.tasks]
    if args.quick:  # two lrs, one head lr
        tasks = [replace(t, lrs=t.lrs[:2], head_lrs=t.head_lrs[:1]) for t in tasks]
    prepared = {t.name: build_data(t, args.out, args.quick) for t in tasks}
    for phase in PHASES if args.phase == "all" else [args.phase] if args.phase != "report" else []:
        run_phase(args, phase, tasks, prepared)
    write_report(args.out, tasks, prepared)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
