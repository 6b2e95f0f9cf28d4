#!/usr/bin/env bash
# The library as a new user installs it, which an editable install can hide: build the wheel, install it into a
# fresh virtual environment beside PyPI's `kernels` package (the Hugging Face kernel hub), and from an empty
# directory train 2 steps on the embedded dataset, run the step benchmark at tiny size, and import both `kernels`.
#   bash .ci/wheel_check.sh [PYTHON]     (PYTHON builds the wheel and the venv; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${1:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }; }

rm -rf "$ROOT/build"  # a stale build/lib could slip removed modules into the wheel
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
rm -rf "$ROOT/build"
WHEEL=$(ls "$WORK"/dist/vjepa_fast-*.whl)
echo "wheel: $(basename "$WHEEL"); top-level names it installs:" \
  $(unzip -Z1 "$WHEEL" | cut -d/ -f1 | sort -u | tr '\n' ' ')
"$PYTHON" -m venv "$WORK/venv"
quiet "$WORK/venv/bin/pip" install -q "torch==2.13.0"  # the CPU build (a plain torch pulls a CUDA one)
quiet "$WORK/venv/bin/pip" install -q kernels "$WHEEL"

mkdir "$WORK/empty" && cd "$WORK/empty"
export PATH="$WORK/venv/bin:$PATH"
python - <<'PY'
import importlib.metadata as md
import kernels, vjepa_fast, vjepa_fast.kernels
top = sorted({f.parts[0] for f in md.files("vjepa_fast") if not f.parts[0].endswith(".dist-info")}
             - {"..", "bin"})
assert top == ["vjepa_fast"], f"vjepa_fast installs the top-level names {top}"
assert "site-packages" in vjepa_fast.__file__, vjepa_fast.__file__
assert hasattr(kernels, "get_kernel") and "site-packages/kernels" in kernels.__file__, kernels.__file__
assert hasattr(vjepa_fast.kernels, "pack_tokens")
print("imports: vjepa_fast.kernels", vjepa_fast.kernels.__file__, "| Hugging Face kernels", kernels.__file__)
PY
vjepa-fast train --max-steps 2 --no-progress
test -f runs/demo/checkpoints/latest.pt
vjepa-fast bench step --config demo --set data.batch_size=2 --set model.depth=2 --set model.pred_depth=1 \
  --steps 1 --warmup 1 --out bench_out
test -f bench_out/step_demo.json
echo "wheel check passed"
