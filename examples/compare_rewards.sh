#!/usr/bin/env bash
# README's reward table: every reward mode from one shared warm start per seed (`selfjudge compare`),
# 5 seeds at the default learning rate and 3 at 3x, means and 95% intervals of each held-out figure's
# change. Resumable: a rerun skips finished runs. Output: runs/compare/compare.md and compare.json.
# One run per core at once (--jobs, each run single-threaded, for the embedded CPU default); pass
# --jobs N to change it, e.g. --jobs 1 with a config whose runs each take the whole GPU.
# Usage: bash examples/compare_rewards.sh [compare options, e.g. --modes majority,judge] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
OMP_NUM_THREADS=1 exec .venv/bin/selfjudge compare --out runs/compare --seeds 5 --lr-scale 3 --lr-scale-seeds 3 \
    --jobs "$(nproc)" "$@"
