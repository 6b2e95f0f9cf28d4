#!/usr/bin/env bash
# The two quickstart commands, each setting itself up on a fresh machine (a venv in .venv on first use):
#   ./dev.sh train [vjepa-fast train options]   pretrain the demo config on the embedded synthetic dataset
#   ./dev.sh test  [pytest options]             run the test suite (CPU; Triton kernels in the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VJEPA_FAST_VENV:-.venv}

pip_install() {  # quiet, minus this machine's notes about absent local package folders
  "$VENV/bin/pip" install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
}

setup() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat setup.py dev.sh | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return
  echo "dev.sh: setting up $VENV (first run only)" >&2
  # A CPU torch unless one is already there (on a CUDA machine, install your CUDA build of torch first).
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
  pip_install "triton==3.6.0" -e ".[test]"
  touch "$stamp"
}

setup_dali() {  # NVIDIA DALI for the DALI loader's tests (a 425 MB wheel, ~1 GB installed)
  [ -f "$VENV/.dali-installed" ] && return
  if pip_install -e ".[dali]"; then touch "$VENV/.dali-installed"; else
    echo "dev.sh: NVIDIA DALI did not install; its tests will skip" >&2; fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) setup; exec "$VENV/bin/vjepa-fast" train "$@" ;;
  test)  setup; setup_dali; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh train [vjepa-fast train options] | ./dev.sh test [pytest options]" >&2; exit 2 ;;
esac
