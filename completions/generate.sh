#!/usr/bin/env bash
# Regenerate the shell completion scripts from the app (tests/test_completions.py fails when stale).
set -euo pipefail
cd "$(dirname "$0")"
for shell in bash zsh fish; do
  _LORAXS_COMPLETE="source_${shell}" loraxs > "loraxs.${shell}"
done
