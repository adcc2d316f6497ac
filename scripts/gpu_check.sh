#!/usr/bin/env bash
# The one command a machine with one GPU runs (in < 8 minutes): the gpu test marker, a CUDA GRPO step
# of a small model with each loss.impl, and the kernel benchmarks at N=16k, V=152,064 (bf16) with a
# short --block-v sweep; it writes one JSON under benchmarks/results/ (commit it).
#
#   bash scripts/gpu_check.sh --wheelhouse DIR [--out benchmarks/results]
#       on the GPU machine (Python 3.12 with its own torch and Triton, no internet): installs the
#       pinned pure-Python packages it lacks (megatron-core, omegaconf, pytest, rich, ...) from DIR
#       with --no-index into a venv that sees the image's torch, then runs every step.
#   bash scripts/gpu_check.sh --fetch-wheels DIR
#       on a machine with PyPI: downloads those wheels for CPython 3.12 / manylinux x86_64 into DIR
#       (7 MB with --lean, which leaves out numpy, pillow and pyarrow, normally in a CUDA PyTorch
#       image; 78 MB with them). Keep DIR out of git (.gpu_wheels/ is ignored) and hand it to the GPU
#       machine (the device tool's `carry` takes up to 64 MiB: the lean folder fits).
#   ... [--steps tests,logits,sweep,linear]   run only those steps (e.g. a second, shorter try)
#   bash scripts/gpu_check.sh --dry-run [--out DIR]
#       on a CPU: the same steps with the current Python, no install, tiny benchmark shapes (kernels
#       in Triton's interpreter, the gpu tests skip), and the same JSON assembly (marked dry_run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
REQUIREMENTS=scripts/gpu_requirements.txt
IMAGE_PACKAGES='numpy|pillow|pyarrow'  # normally in a CUDA PyTorch image (the end of $REQUIREMENTS)
OUT=benchmarks/results
WHEELHOUSE=""
FETCH=""
LEAN=0
DRY_RUN=0
STEPS_WANTED=tests,logits,sweep,linear
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}  # the whole check must end within 8 minutes

usage() { sed -n '2,18p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --fetch-wheels) FETCH=${2:?--fetch-wheels needs a folder}; shift 2 ;;
    --lean) LEAN=1; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --steps) STEPS_WANTED=${2:?--steps needs a list}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage ;;
  esac
done

if [ -n "$FETCH" ]; then
  mkdir -p "$FETCH"
  pip_cmd=(python3 -m pip)
  [ -x .venv/bin/python ] && pip_cmd=(.venv/bin/python -m pip)
  args=(download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        -d "$FETCH")
  # Requirement lines without comments; --lean leaves out what a CUDA PyTorch image normally has.
  mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$REQUIREMENTS")
  if [ "$LEAN" = 1 ]; then
    mapfile -t wanted < <(printf '%s\n' "${wanted[@]}" | grep -viE "^(${IMAGE_PACKAGES})([<>=]|$)")
  fi
  # A lower bound is fetched at the exact version constraints.txt pins (the tested one).
  for i in "${!wanted[@]}"; do
    name=${wanted[$i]%%[<>=]*}
    pinned=$(grep -iE "^${name}==" constraints.txt || true)
    [ -n "$pinned" ] && wanted[i]=$pinned
  done
  # setuptools and wheel build this project's own wheel (pip's build isolation takes them from DIR too).
  "${pip_cmd[@]}" "${args[@]}" "${wanted[@]}" setuptools==84.2.1 wheel==0.45.1
  du -sh "$FETCH"
  exit 0
fi

START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STEPS="$WORK/steps.json"
echo '{}' > "$STEPS"
echo "gpu_check: scratch folder $WORK"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME SECONDS CMD...: run with a timeout bounded by what is left of the budget; record status and time.
step() {
  local name=$1 limit=$2 status=ok begin rc
  shift 2
  local remaining
  remaining=$(left)
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  begin=$(date +%s)
  if [ "$limit" -le 5 ]; then
    status="skipped: out of time"
  else
    echo "== $name (limit ${limit}s)"
    set +e
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    set -e
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out after ${limit}s"
    elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
  fi
  record "$name" "$status" "$(( $(date +%s) - begin ))"
}

# record NAME STATUS SECONDS: one entry of steps.json.
record() {
  "$PY" - "$STEPS" "$@" <<'EOF'
import json, sys
path, name, status, seconds = sys.argv[1:]
steps = json.load(open(path))
steps[name] = {"status": status, "seconds": int(seconds)}
json.dump(steps, open(path, "w"), indent=2)
EOF
  echo "== $1: $2"
}

if [ "$DRY_RUN" = 1 ]; then
  PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
  export TRITON_INTERPRET=1
  LOGITS_SHAPE=(--tokens 16 --vocab 300 --reps 1 --warmup 0 --providers fused eager liger)
  SWEEP=(128 256)
  LINEAR_SHAPE=(--tokens 32 --memory-tokens 64 128 256 --vocab 256 --hidden 16 --chunk-tokens 32 --reps 1
                --warmup 0 --providers fused_linear logits_kernel eager liger)
else
  [ -n "$WHEELHOUSE" ] || { echo "gpu_check.sh: --wheelhouse DIR is required (or --dry-run)" >&2; exit 2; }
  [ -d "$WHEELHOUSE" ] || { echo "gpu_check.sh: wheelhouse $WHEELHOUSE is not a folder" >&2; exit 2; }
  BASE=${PYTHON:-python3}
  "$BASE" -c 'import torch, triton, sys; assert torch.cuda.is_available(), "no CUDA device"; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name(0))'
  # A venv that sees the image's torch and Triton (system site packages) and adds only what is missing;
  # without ensurepip in the image, a --target folder on PYTHONPATH does the same.
  if "$BASE" -m venv --system-site-packages "$WORK/venv" 2>/dev/null; then
    PY="$WORK/venv/bin/python"
    target=()
  else
    PY=$BASE
    target=(--target "$WORK/site")
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # --no-deps everywhere: $REQUIREMENTS lists every dependency itself, so pip never tries to resolve
  # (or replace) the image's torch, and --target (which ignores installed packages) works the same.
  pip_install=("$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELHOUSE" "${target[@]}")
  sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$REQUIREMENTS" > "$WORK/all.txt"
  grep -viE "^(${IMAGE_PACKAGES})([<>=]|$)" "$WORK/all.txt" > "$WORK/core.txt"
  step install 120 "${pip_install[@]}" -r "$WORK/core.txt"
  # What the image normally has is installed only when it cannot be imported, one at a time: one that
  # is neither there nor in a --lean wheelhouse then fails only itself (and the tests needing it).
  mapfile -t image < <(grep -iE "^(${IMAGE_PACKAGES})([<>=]|$)" "$WORK/all.txt")
  for requirement in "${image[@]}"; do
    name=${requirement%%[<>=]*}
    module=$name
    [ "$name" = pillow ] && module=PIL
    if "$PY" -c "import $module" 2>/dev/null; then
      record "install_$name" "ok: the image has it" 0
    else
      step "install_$name" 60 "${pip_install[@]}" "$requirement"
    fi
  done
  step install_package 60 "${pip_install[@]}" "$ROOT"
  LOGITS_SHAPE=(--tokens 16384 --vocab 152064 --dtype bfloat16 --reps 10 --warmup 3)
  SWEEP=(2048 8192)
  LINEAR_SHAPE=(--tokens 16384 --memory-tokens 4096 16384 65536 131072 --vocab 152064 --hidden 3584
                --dtype bfloat16 --reps 5 --warmup 2)
fi

wants() { [[ ",$STEPS_WANTED," == *",$1,"* ]]; }
mkdir -p "$WORK/logits" "$WORK/fused_linear" "$OUT"
OUT=$(cd "$OUT" && pwd)
# From here on the scratch folder is the working directory: `python -m` puts it first on sys.path, so
# the installed package is imported, not the checkout's megatron_selfjudge/ (which lacks kernels/).
cd "$WORK"
if wants tests; then
  # The gpu marker: the kernels at GPU sizes and the CUDA GRPO step of a tiny model with each loss.impl.
  step gpu_tests 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/junit.xml" \
    "$ROOT/tests/kernels/test_grpo_loss.py" "$ROOT/tests/kernels/test_fused_linear_grpo.py" \
    "$ROOT/tests/megatron/test_train_step.py"
fi
wants logits && step bench_logits 150 "$PY" -m megatron_selfjudge.kernels.bench --suite logits "${LOGITS_SHAPE[@]}" \
  --out "$WORK/logits"
wants sweep || SWEEP=()
for block_v in "${SWEEP[@]}"; do
  mkdir -p "$WORK/sweep_$block_v"
  # One provider per sweep point: only the kernel's launch changes. Distinct folders: same file name.
  step "bench_logits_block_v_$block_v" 40 "$PY" -m megatron_selfjudge.kernels.bench --suite logits \
    "${LOGITS_SHAPE[@]}" --providers fused --block-v "$block_v" --out "$WORK/sweep_$block_v"
  if compgen -G "$WORK/sweep_$block_v/*.json" > /dev/null; then
    for f in "$WORK/sweep_$block_v"/*.json; do mv "$f" "$WORK/logits/block_v_${block_v}_$(basename "$f")"; done
  fi
done
wants linear && step bench_fused_linear 150 "$PY" -m megatron_selfjudge.kernels.bench --suite fused_linear \
  "${LINEAR_SHAPE[@]}" --out "$WORK/fused_linear"

report=(--work "$WORK" --out "$OUT")
[ "$DRY_RUN" = 1 ] && report+=(--dry-run)
"$PY" -m megatron_selfjudge.kernels.gpu_report "${report[@]}"
# The memory figure goes beside the JSON (the JSON itself records where it was drawn).
if compgen -G "$WORK/fused_linear/*.png" > /dev/null; then cp "$WORK"/fused_linear/*.png "$OUT"/; fi
echo "gpu_check: done in $(( $(date +%s) - START ))s"
