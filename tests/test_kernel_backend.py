"""Where the Triton kernels run, and that a test run cannot pass without running them: the fast path and the EMA take
the kernels wherever kernels.runs_on says they run (else the fast-vs-reference tests compare the references with
themselves), a run with neither CUDA nor the interpreter stops at its start, and every run counts its skips."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from vjepa_fast import kernels
from vjepa_fast.kernels import _common
from vjepa_fast.model import VJEPA
from vjepa_fast.models.packed import kernel_ops
from vjepa_fast.step import EMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("interpreted", [True, False])
def test_the_fast_path_and_the_ema_take_the_kernels_where_they_run(interpreted, monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", interpreted)
    ops = kernel_ops(torch.device("cpu"))
    if interpreted:
        assert tuple(ops) == (kernels.pack_tokens, kernels.masked_l1_loss, kernels.rope)
    else:  # the references where the kernels cannot run: a CPU run without the interpreter
        assert tuple(ops) == (kernels.pack_tokens_reference, kernels.masked_l1_loss_reference, kernels.rope_reference)
    assert (EMA(VJEPA(tiny_config()), fused=True).flat is not None) == interpreted


def test_the_interpreter_switch_is_read_from_the_kernels():
    """INTERPRET is what triton.jit made of TRITON_INTERPRET when the kernels were defined, on every Triton version."""
    script = "from vjepa_fast.kernels import _common; print(_common.INTERPRET, _common.runs_on('cpu'))"
    for value, expected in (("1", "True True"), ("0", "False False")):
        out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET=value),
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == expected.split(), out.stderr[-2000:]


def _pytest_without_cuda(*args, **env):
    """pytest on this suite in a subprocess with the GPUs hidden: (exit code, stdout + stderr)."""
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", **env)
    environment.pop("PYTEST_ADDOPTS", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                         env=environment, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_a_run_without_cuda_or_the_interpreter_stops_at_its_start():
    code, out = _pytest_without_cuda("tests/test_kernel_rope.py::test_grid_positions", TRITON_INTERPRET="0")
    assert code == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "no usable CUDA device and the Triton interpreter is off" in out and " passed" not in out, out[-3000:]


def test_a_run_ends_with_the_tests_each_skip_reason_removed():
    code, out = _pytest_without_cuda("tests/test_kernel_rope.py", "-k", "no_rows or other_dtypes")
    assert code == 0, out[-3000:]
    assert "skips by reason: needs CUDA: 3 tests" in out.splitlines(), out[-3000:]
