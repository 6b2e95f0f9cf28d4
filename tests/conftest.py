"""Test-wide setup: the Triton kernels run compiled on a working CUDA device, else on the CPU in the Triton
interpreter, and a run where they can run nowhere stops at its start; GPU tests skip without CUDA; the run ends with a
line counting the tests each skip reason removed."""
import collections
import os

import torch


def _cuda_works() -> bool:
    """A CUDA device that takes a tiny allocation: an installed driver (nvidia-smi) or torch.cuda.is_available()
    alone does not mean a device the tests can use."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.ones(1, device="cuda").item() == 1.0
    except Exception:  # noqa: BLE001 -- whatever the device's failure, the tests have no CUDA
        return False


CUDA = _cuda_works()
if not CUDA:  # the interpreter, which must be on before triton is first imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vjepa_fast import kernels  # noqa: E402


def pytest_configure(config):
    # Kernels nowhere: every kernel test would skip and the fast path would take the PyTorch references (comparing
    # them with themselves), so the run would pass having checked no kernel.
    if not CUDA and not kernels.runs_on("cpu"):
        raise pytest.UsageError(
            f"no usable CUDA device and the Triton interpreter is off (TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', '')!r}; it must be 1 before triton is first imported): the kernels "
            f"can run nowhere; unset TRITON_INTERPRET or set it to 1")


def pytest_report_header(config):
    how = "in the Triton interpreter" if kernels.runs_on("cpu") else "compiled"
    return f"kernels: {how}, tested on {'CUDA' if CUDA else 'the CPU (no usable CUDA)'}"


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line: how many tests each skip reason removed (a module skipped whole, whose tests were never collected,
    counts as a module)."""
    counts = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        unit = "module" if isinstance(report, pytest.CollectReport) else "test"
        counts[reason.removeprefix("Skipped: "), unit] += 1
    if counts:
        terminalreporter.write_line("skips by reason: " + "; ".join(
            f"{reason}: {n} {unit}{'s' * (n > 1)}" for (reason, unit), n in counts.most_common()))


@pytest.fixture
def poison_empty():
    """torch.empty fills floats with NaN and ints with their max, so an output element (or per-program partial
    sum) a kernel does not write fails the comparisons."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """16 tiny synthetic videos (24 frames, 40 px) with their dataset files."""
    pytest.importorskip("av", reason="PyAV writes and decodes the synthetic videos (pip install av)")
    from vjepa_fast.synthetic import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return ensure_synthetic_dataset(str(root), num_videos=16, frames=24, size=40, progress=False)
