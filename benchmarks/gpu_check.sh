#!/usr/bin/env bash
# One GPU check, ready for the day a GPU is lent: correctness on CUDA and the GPU benchmarks, one JSON
# document on stdout (progress on stderr). `--cpu`: the same checks at CPU sizes, as CI runs them.
# Exit status: 0 when every correctness check and benchmark ran and passed its tolerance, 1 otherwise,
# 2 without a CUDA device (and no --cpu). Details: benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's loraxs_cli, installed or not
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
