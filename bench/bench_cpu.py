"""CPU-measurable pieces under pytest-benchmark, kept out of the default test run:

    python -m pytest bench/bench_cpu.py --benchmark-columns=median,iqr,rounds

Mask generation (vectorised vs the per-sample loop), the PyAV clip loader, and a tiny training step on the
reference and the fast path.
"""
import sys
from pathlib import Path

import pytest
import torch

from bench.masks import LoopMaskGenerator
from vjepa_fast.bench.step import SyntheticSteps
from vjepa_fast.config import load_config
from vjepa_fast.masks import MaskGenerator


@pytest.mark.parametrize("kind", ["vectorised", "loop"])
def test_mask_generation(benchmark, kind):
    cfg = load_config("vitl16")
    cls = MaskGenerator if kind == "vectorised" else LoopMaskGenerator
    gen = cls(cfg.mask, 224, 16, 16, 2)
    g = torch.Generator().manual_seed(0)
    benchmark(gen.gen, 24, 0, generator=g)


def test_pyav_loader(benchmark, tmp_path):
    from vjepa_fast.dali_pipelines import ClipSpec, make_loader
    from vjepa_fast.synthetic import ensure_synthetic_dataset

    data = ensure_synthetic_dataset(str(tmp_path), num_videos=32, frames=40, size=80, progress=False)
    loader = make_loader([data.motion_csv], ClipSpec(num_frames=8, sampling_rate=4, crop_size=64), batch_size=8,
                         seed=0, num_workers=0, loader="pyav")
    try:
        benchmark(next, loader)
    finally:
        loader.close()


@pytest.mark.parametrize("computation", ["reference", "fast"])
def test_tiny_step(benchmark, computation):
    cfg = load_config("demo", ["data.batch_size=8", "model.depth=2", "model.pred_depth=2"])
    runner = SyntheticSteps(cfg, computation, "sdpa", torch.device("cpu"))
    benchmark(runner.run, 0)


if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__)), *sys.argv[1:]]))
