#!/usr/bin/env bash
# The GPU check, in one go (at most 8 minutes on one H100): environment, the GPU-marked tests, the kernel
# benchmark, and the step benchmark (reference vs fast, per attention backend) for ViT-L/16 and ViT-H/16 at
# batch 24, 16x224x224, bf16, then the fast ViT-L/16 step torch.compile'd. Results go under OUT (default
# bench/out/gpu): kernels.json, step_*.json/.png, compiled/step_vitl16.json and gpu_check.log (everything
# printed; at most 8 files come back from the device tool); the summary tables are printed last.
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
python3 -c "import torch, xformers.ops as x; q = torch.randn(1, 8, 2, 64, device='cuda', dtype=torch.bfloat16)
x.memory_efficient_attention(q, q, q)" 2>/dev/null && BACKENDS=sdpa,xformers  # a carried wheel may not match torch
# Stage limits add up to 8 minutes; the step benchmarks run eager first, so a slow compile costs only its own stage.
stage gpu-tests 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests
stage kernels 100 python3 -m bench.kernels --out "$OUT"
stage step-vitl16 100 python3 -m vjepa_fast.cli bench step --config vitl16 --batch 24 --steps 8 --warmup 3 \
  --backends "$BACKENDS" --out "$OUT"
stage step-vith16 80 python3 -m vjepa_fast.cli bench step --config vith16 --batch 24 --steps 5 --warmup 2 \
  --out "$OUT"
stage step-vitl16-compiled 140 python3 -m vjepa_fast.cli bench step --config vitl16 --batch 24 --compile \
  --paths fast --no-parity --steps 8 --warmup 4 --out "$OUT/compiled"

echo
echo "================ summary ================"
cat "$OUT"/*.md "$OUT"/compiled/*.md 2>/dev/null
grep '^=== .*: exit' "$LOG"
rm -f "$OUT"/*.md "$OUT"/compiled/*.md "$OUT"/compiled/*.png  # the tables are in the log; at most 8 files come back
