#!/usr/bin/env bash
# The two quickstart commands, each setting itself up on a fresh machine (a venv in .venv on first use):
#   ./dev.sh train [vjepa-fast train options]   pretrain the demo config on the embedded synthetic dataset
#   ./dev.sh test  [pytest options]             run the test suite (CPU; Triton kernels in the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VJEPA_FAST_VENV:-.venv}

setup() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat setup.py dev.sh | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return
  echo "dev.sh: setting up $VENV (first run only)" >&2
  # A CPU torch unless one is already there (on a CUDA machine, install your CUDA build of torch first).
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q "triton==3.6.0" -e ".[test]"
  # NVIDIA DALI for the DALI loader's tests (a 425 MB wheel, ~1 GB installed); they skip where it cannot install.
  "$VENV/bin/pip" install -q -e ".[dali]" || echo "dev.sh: NVIDIA DALI did not install; its tests will skip" >&2
  touch "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) setup; exec "$VENV/bin/vjepa-fast" train "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh train [vjepa-fast train options] | ./dev.sh test [pytest options]" >&2; exit 2 ;;
esac
