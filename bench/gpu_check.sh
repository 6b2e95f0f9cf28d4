#!/usr/bin/env bash
# The GPU check, in one go, inside 7 minutes of wall time on one H100/H200. Stages, in order of value:
#
#   stage          limit  what, and where the limit comes from (measured 2026-11-29 on the 2-core CPU machine)
#   env             30 s  versions and the card; imports only
#   ceilings        45 s  bf16 8192^3 matmul TFLOP/s and 1 GiB device copy GB/s (bench/ceilings.py); CUDA start ~5 s
#   gpu-tests      150 s  pytest -m gpu but the RoPE kernel's (167 cases, the sync-rule test first), --timeout 120 per
#                         test: ~89 Triton compiles at 0.2-0.95 s each for sm_90 (timed here with Triton's ptxas:
#                         ~35 s), one cold torch.compile of the blocks (49 s here on the CPU's Inductor; a 16-core
#                         box less) and the tests themselves
#   official        75 s  the official ViT-L/16 B=24 step (bench/official.py with --official DIR): it builds the
#                         model on the CPU (17 s here for ViT-L) then 3 + 10 iterations
#   step-vitl16    150 s  our ViT-L/16 B=24 step: reference, fast per attention backend, then fast compiled; each
#                         built on the device (~2 s), 3 + 8 steps and a parity batch; the compiled variant pays a
#                         cold compilation of the bf16 graphs (the longest part; it runs last so it costs only itself)
#   kernels         45 s  the Triton kernels vs eager PyTorch at ViT-L/H sizes (~14 compiles, do_bench 0.2 s a row)
#   gpu-tests-rope  90 s  pytest -m gpu of V-JEPA 2's RoPE kernel (the models' head dims): ~46 compiles at 1.2-2.3 s
#                         each timed here on 2026-11-30 (sin, cos and fp64 exp2 make them slower than the others)
#   step-vith16     60 s  the ViT-H/16 step, reference and fast, eager
#
# The limits add up to more than 7 minutes because each is an upper bound: a global deadline (380 s after the start)
# cuts whichever stage is running when it passes and skips the rest, so the lowest-value stages are the ones lost.
# A stage cut short gets SIGINT first (pytest then prints its failures, a benchmark keeps the rows it wrote).
# Results go to OUT (default bench/out/gpu), at most 8 files (the device tool brings back 8): gpu_check.log
# (everything printed), ceilings.json, official.json, step_vitl16.json/.png, kernels.json, step_vith16.json/.png.
# The summary tables (bench/summary.py) are printed last.
#
#   bash bench/gpu_check.sh [--official DIR] [OUT]     the check; DIR holds jepa_step.py and the official jepa/
#   bash bench/gpu_check.sh --dry-run [--official DIR] [OUT]
#                          every stage's command on the CPU at demo size (no limits beyond 10 min a stage): what CI
#                          runs so that a rename cannot break the GPU check unnoticed
#   bash bench/gpu_check.sh [OUT] learning             instead: the learning proof on synthetic data (~5 min)
#
# The commit printed first is VJEPA_FAST_COMMIT where set (a copy of the tree without .git), else git's.
# Meant for a machine with torch + triton preinstalled and no internet. Packages it lacks (xformers, PyAV) come
# from whatever PYTHONPATH the caller sets; nothing here needs them.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 OFFICIAL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --official) OFFICIAL=$(cd "$2" && pwd) || { echo "gpu_check: --official $2: no such folder" >&2; exit 2; }; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:-bench/out/gpu}
MODE=${2:-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # every bench writes here; the chosen result files are copied to OUT
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
RESULTS="gpu_check.log ceilings.json official.json kernels.json step_*.json step_*.png"
(cd "$OUT" && rm -f $RESULTS)  # no stale result of an earlier run beside this one's
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=$((START + 380))

stage() {  # stage NAME SECONDS COMMAND...: run within its limit and the deadline, log everything, note the status
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - $(date +%s)))
  [ "$MODE" = learning ] && left=$limit
  [ "$DRY" = 1 ] && { limit=600; left=600; }
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped, out of time" | tee -a "$LOG"; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s in all" | tee -a "$LOG"
}

keep() {  # keep FILE...: copy results that exist into OUT
  for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
}

echo "commit: ${VJEPA_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  date: $(date -u +%F)  mode: $MODE$(
  [ "$DRY" = 1 ] && echo ' (dry run)')" | tee "$LOG"
stage env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no GPU"
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)"
  for pkg in xformers av nvidia.dali; do
    python3 -c "import $pkg as m; print(\"$pkg\", m.__version__)" 2>/dev/null || echo "$pkg: not installed"
  done'

if [ "$MODE" = learning ]; then
  stage learning-proof 540 bash bench/learning_proof.sh "$OUT"
  exit 0
fi

if [ "$DRY" = 1 ]; then  # demo sizes on the CPU; the official harness builds named models only (vit_tiny, depth 12)
  MAIN=(--config demo --batch 4) SECOND=(--config demo --batch 2) STEPS=(--steps 2 --warmup 1)
  OFFICIAL_ARGS=(--config demo --set model.depth=null --batch 2 --steps 2 --warmup 1) KERNELS=(--quick)
  MAIN_NAME=demo SECOND_NAME=demo
else
  MAIN=(--config vitl16 --batch 24) SECOND=(--config vith16 --batch 24) STEPS=(--steps 8 --warmup 3)
  OFFICIAL_ARGS=(--config vitl16 --batch 24 --steps 10 --warmup 3) KERNELS=()
  MAIN_NAME=vitl16 SECOND_NAME=vith16
fi

stage ceilings 45 python3 -m vjepa_fast.bench.ceilings --out "$WORK"
keep "$WORK/ceilings.json"
PEAK=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['matmul_tflops'])" "$OUT/ceilings.json" 2>/dev/null)
PEAK_ARGS=(${PEAK:+--peak-tflops "$PEAK"})

# the sync-rule test first: pytest keeps the order of files named one by one (not of a file and its folder)
stage gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_step_sync.py \
  $(ls tests/test_*.py | grep -v -e test_step_sync -e test_kernel_rope)

if [ -n "$OFFICIAL" ]; then
  stage official 75 python3 -m bench.official --official "$OFFICIAL" "${OFFICIAL_ARGS[@]}" "${PEAK_ARGS[@]}" --out "$WORK"
  keep "$WORK/official.json"
else
  echo "=== official: skipped (no --official DIR)" | tee -a "$LOG"
fi

BACKENDS=sdpa
timeout 30 python3 -c "import torch, xformers.ops as x; q = torch.randn(1, 8, 2, 64, device='cuda', dtype=torch.bfloat16)
x.memory_efficient_attention(q, q, q)" 2>/dev/null && BACKENDS=sdpa,xformers  # a carried wheel may not match torch
stage "step-$MAIN_NAME" 150 python3 -m vjepa_fast.cli bench step "${MAIN[@]}" "${STEPS[@]}" --compile both \
  --backends "$BACKENDS" "${PEAK_ARGS[@]}" --out "$WORK/main"
keep "$WORK/main/step_$MAIN_NAME.json" "$WORK/main/step_$MAIN_NAME.png"

stage kernels 45 python3 -m bench.kernels "${KERNELS[@]}" --out "$WORK"
keep "$WORK/kernels.json"

stage gpu-tests-rope 90 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 tests/test_kernel_rope.py

stage "step-$SECOND_NAME" 60 python3 -m vjepa_fast.cli bench step "${SECOND[@]}" "${STEPS[@]}" "${PEAK_ARGS[@]}" \
  --out "$WORK/second"
if [ "$SECOND_NAME" != "$MAIN_NAME" ]; then
  keep "$WORK/second/step_$SECOND_NAME.json" "$WORK/second/step_$SECOND_NAME.png"
fi

echo
echo "================ summary ================" | tee -a "$LOG"
timeout 60 python3 -m bench.summary --main "$MAIN_NAME" "$OUT" 2>&1 | tee -a "$LOG"
grep '^=== .*: \(exit\|skipped\)' "$LOG"
echo "wall time: $(( $(date +%s) - START ))s; result files: $(ls "$OUT" | tr '\n' ' ')"
