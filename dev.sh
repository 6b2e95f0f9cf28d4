#!/usr/bin/env bash
# The quickstart commands, each setting itself up on a fresh machine (a venv on first use):
#   ./dev.sh train [vjepa-fast train options]   pretrain the demo config on the embedded synthetic dataset
#   ./dev.sh test  [pytest options]             run the test suite (CPU; Triton kernels in the interpreter)
#   ./dev.sh test-latest [pytest options]       the kernel, fast-path and step tests under the newest torch and
#                                               triton that setup.py allows, in .venv-latest (CUDA wheels, ~2.8 GB)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VJEPA_FAST_VENV:-.venv}
LATEST_VENV=.venv-latest
LATEST_TESTS=(tests/test_kernel_*.py tests/test_fast_path.py tests/test_step_sync.py tests/test_model_loss.py
              tests/test_vjepa2.py::test_rope_and_sincos_models_fast_equals_reference
              tests/test_vjepa2.py::test_a_mixed_length_batch_in_one_pass_equals_the_official_passes)

pip_install() {  # VENV ARGS...: quiet, minus this machine's notes about absent local package folders
  local venv=$1
  shift
  "$venv/bin/pip" install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
}

new_stamp() {  # VENV: the file that marks VENV set up for this setup.py and dev.sh; empty when it already is
  local stamp
  stamp="$1/.installed-$(cat setup.py dev.sh | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] || echo "$stamp"
}

setup() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp
  stamp=$(new_stamp "$VENV")
  [ -n "$stamp" ] || return 0
  echo "dev.sh: setting up $VENV (first run only)" >&2
  # A CPU torch unless one is already there (on a CUDA machine, install your CUDA build of torch first).
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install "$VENV" "torch==2.13.0"
  pip_install "$VENV" "triton==3.6.0" -e ".[test]"
  touch "$stamp"
}

setup_latest() {  # what `pip install vjepa_fast` brings a new user today: PyPI's torch (a CUDA build) and its triton
  [ -x "$LATEST_VENV/bin/python" ] || python3 -m venv "$LATEST_VENV"
  local stamp
  stamp=$(new_stamp "$LATEST_VENV")
  [ -n "$stamp" ] || return 0
  echo "dev.sh: setting up $LATEST_VENV with the newest torch and triton (first run only)" >&2
  # PIP_CONSTRAINT: the newest releases even where this machine's pip configuration caps torch at older ones.
  PIP_CONSTRAINT=/dev/null pip_install "$LATEST_VENV" --upgrade --upgrade-strategy eager -e ".[test]"
  touch "$stamp"
}

setup_dali() {  # NVIDIA DALI for the DALI loader's tests (a 425 MB wheel, ~1 GB installed)
  [ -f "$VENV/.dali-installed" ] && return
  if pip_install "$VENV" -e ".[dali]"; then touch "$VENV/.dali-installed"
  elif [ "${CI:-}" = true ]; then echo "dev.sh: NVIDIA DALI did not install; CI runs its tests" >&2; exit 1
  else echo "dev.sh: NVIDIA DALI did not install; its tests will skip" >&2; fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) setup; exec "$VENV/bin/vjepa-fast" train "$@" ;;
  test)  setup; setup_dali; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  test-latest)
    setup_latest
    "$LATEST_VENV/bin/python" -c \
      "import torch, triton; print(f'dev.sh: torch {torch.__version__}, triton {triton.__version__}')"
    exec "$LATEST_VENV/bin/python" -m pytest -q "$@" "${LATEST_TESTS[@]}" ;;
  *) echo "usage: ./dev.sh train [vjepa-fast train options] | ./dev.sh test [pytest options]" \
          "| ./dev.sh test-latest [pytest options]" >&2; exit 2 ;;
esac
