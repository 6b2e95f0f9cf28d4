"""Test-wide setup: Triton kernels run in the interpreter on CPU-only machines, GPU tests skip without CUDA."""
import os
import shutil

# Must be set before triton is first imported anywhere.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
