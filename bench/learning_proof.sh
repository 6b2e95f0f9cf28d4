#!/usr/bin/env bash
# The learning proof on one GPU: pretrain configs/synthetic_gpu.yaml (about 5 minutes on one H100), then run the
# synthetic motion benchmark on the checkpoint and on its random init. Pretraining learned if the linear probe's
# motion accuracy rises well above the random-init encoder's (target: >= 10 points). Needs PyAV (a carried wheel
# on the GPU machine). Writes metrics.csv, loss.png and the benchmark table (learning_proof.md) under OUT.
#   bash bench/learning_proof.sh [OUT]        (bench/gpu_check.sh OUT learning runs it with time limits)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/gpu}
RUN=${LEARNING_RUN_DIR:-/tmp/vjepa_fast_synthetic_gpu}
mkdir -p "$OUT"
python3 -m vjepa_fast.cli train --config synthetic_gpu --run-dir "$RUN" --overwrite --no-progress
cp "$RUN/metrics.csv" "$RUN/loss.png" "$OUT/"
python3 -m vjepa_fast.cli eval --benchmark synthetic --checkpoint "$RUN/checkpoints/latest.pt" \
  --out-dir "$RUN/eval" --workers 8 --no-progress | tee "$OUT/learning_proof.md"
