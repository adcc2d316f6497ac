#!/usr/bin/env bash
# Reproduce README's table: the embedded default under each reward mode, same seed and warm start.
# Usage: bash examples/compare_rewards.sh [extra key=value overrides, e.g. optim.lr=3e-5]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
for mode in random majority consistency judge; do
  OMP_NUM_THREADS=1 .venv/bin/selfjudge train reward.mode="$mode" trainer.run_dir="runs/compare/$mode" "$@"
done
for mode in random majority consistency judge; do
  echo "== $mode"; tail -n 2 "runs/compare/$mode/results.md"
done
