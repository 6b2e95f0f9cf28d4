"""Mask generation speed: the vectorised MaskGenerator against a per-sample Python loop (the official shape).

    python -m bench.masks [--batch 24] [--steps 50] [--out bench/out]

Target (docs/design.md, section 7): >= 20x faster than the loop on CPU at 224 px, 16 frames, batch 24.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from vjepa_fast.bench.report import write_results
from vjepa_fast.config import load_config
from vjepa_fast.masks import MaskGenerator


class LoopMaskGenerator(MaskGenerator):
    """The official algorithm, one sample and one block at a time in Python: the baseline to beat."""

    def gen(self, batch_size, step, device=None, generator=None):
        masks_enc, masks_pred = [], []
        for cfg in self.cfgs:
            t, h, w = self.block_size(cfg, step)
            max_context = max(1, int(self.duration * cfg.max_temporal_keep))
            enc_rows, pred_rows = [], []
            for _ in range(batch_size):
                while True:
                    keep = torch.ones((self.duration, self.height, self.width), dtype=torch.int32)
                    for _ in range(cfg.num_blocks):
                        top = int(torch.randint(0, self.height - h + 1, (1,), generator=generator))
                        left = int(torch.randint(0, self.width - w + 1, (1,), generator=generator))
                        start = int(torch.randint(0, self.duration - t + 1, (1,), generator=generator))
                        block = torch.ones_like(keep)
                        block[start:start + t, top:top + h, left:left + w] = 0
                        block[max_context:] = 0
                        keep *= block
                    keep = keep.flatten()
                    ctx = torch.nonzero(keep).squeeze(1)
                    if len(ctx):
                        break
                enc_rows.append(ctx)
                pred_rows.append(torch.nonzero(keep == 0).squeeze(1))
            k_enc = min(len(r) for r in enc_rows)
            if cfg.max_keep is not None:
                k_enc = min(k_enc, cfg.max_keep)
            k_pred = min(len(r) for r in pred_rows)
            masks_enc.append(torch.stack([r[:k_enc] for r in enc_rows]))
            masks_pred.append(torch.stack([r[:k_pred] for r in pred_rows]))
        return masks_enc, masks_pred


def _time(gen: MaskGenerator, batch: int, steps: int) -> float:
    """Median seconds per call over `steps` calls (after one warm-up call)."""
    g = torch.Generator().manual_seed(0)
    gen.gen(batch, 0, generator=g)
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        gen.gen(batch, step, generator=g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch: int = 24, steps: int = 50, config: str = "vitl16") -> dict:
    cfg = load_config(config)
    d = cfg.data
    args = (cfg.mask, d.crop_size, d.num_frames, d.patch_size, d.tubelet_size)
    fast, loop = _time(MaskGenerator(*args), batch, steps), _time(LoopMaskGenerator(*args), batch, max(3, steps // 10))
    return {"config": config, "batch": batch, "steps": steps, "threads": torch.get_num_threads(),
            "vectorised_ms": fast * 1e3, "loop_ms": loop * 1e3, "speedup": loop / fast}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--config", default="vitl16")
    p.add_argument("--out", default="bench/out")
    a = p.parse_args(argv)
    result = run(a.batch, a.steps, a.config)
    table = (f"| generator | ms / batch |\n|---|---|\n| per-sample loop | {result['loop_ms']:.2f} |\n"
             f"| vectorised | {result['vectorised_ms']:.2f} |\n\nspeed-up: {result['speedup']:.1f}x (batch {a.batch}, "
             f"{a.config}, {result['threads']} threads)\n")
    written = write_results(a.out, "masks", result, table)
    print(table + f"written {written['json']}")
    if not math.isfinite(result["speedup"]):
        raise SystemExit("timing failed")


if __name__ == "__main__":
    main()
