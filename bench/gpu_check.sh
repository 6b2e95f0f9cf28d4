#!/usr/bin/env bash
# The GPU check, in one go (about 6-8 minutes on one H100): environment, the GPU-marked tests, the kernel
# benchmark, and the step benchmark (reference vs fast, per attention backend) for ViT-L/16 and ViT-H/16 at
# batch 24, 16x224x224, bf16. Results go under OUT (default bench/out/gpu): kernels.json, step_*.json/.png and
# gpu_check.log (everything printed); the summary tables are printed last.
#
#   bash bench/gpu_check.sh [OUT]            # the check
#   bash bench/gpu_check.sh [OUT] learning   # instead: the learning proof on synthetic data (~5 min)
#
# Meant for a machine with torch + triton preinstalled and no internet: wheels found in .whl/ (PyAV for the
# data path, xformers) are installed to /tmp/site first. Each stage has its own time limit, so one stage that
# hangs or fails does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/out/gpu}}
MODE=${2:-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log everything, note the exit status
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  date: $(date -u +%F)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import xformers; print('xformers', xformers.__version__)" 2>/dev/null || echo "xformers: not installed"
  python3 -c "import av; print('av', av.__version__)" 2>/dev/null || echo "av: not installed"
} 2>&1 | tee "$LOG"

if [ "$MODE" = learning ]; then
  stage learning-proof 540 bash bench/learning_proof.sh "$OUT"
  exit 0
fi

BACKENDS=sdpa
python3 -c "import xformers.ops" 2>/dev/null && BACKENDS=sdpa,xformers
stage gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests
stage kernels 150 python3 -m bench.kernels --out "$OUT"
stage step-vitl16 200 python3 -m vjepa_fast.cli bench step --config vitl16 --batch 24 --compile --steps 10 \
  --warmup 4 --backends "$BACKENDS" --out "$OUT"
stage step-vith16 150 python3 -m vjepa_fast.cli bench step --config vith16 --batch 24 --compile --steps 6 \
  --warmup 3 --out "$OUT"

rm -f "$OUT"/*.md  # the tables are in the log; the device tool brings back at most 8 files
echo
echo "================ summary ================"
grep -h -A 30 '^\*\*' "$LOG" | grep -v '^written:' || true
grep -h '^| ' "$LOG" | grep -i 'kernel\|gather\|l1\|ema' || true
grep '^=== .*: exit' "$LOG"
