"""A torch.profiler trace of N training steps with named stage ranges (NVTX too on GPU), and optionally a CUDA
memory snapshot.

    vjepa-fast profile --config vitl16 --steps 5 --out runs/profile

Open the trace (trace.json) in chrome://tracing or https://ui.perfetto.dev, the memory snapshot
(memory_snapshot.pickle) in https://pytorch.org/memory_viz. The stages are those of `vjepa-fast bench step`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..step import pick_device
from .step import SyntheticSteps


def run(cfg: Config, out: Path, *, steps: int = 5, warmup: int = 2, device="auto", memory_snapshot: bool = False,
        backend: str | None = None) -> dict[str, Path]:
    device = pick_device(device)
    runner = SyntheticSteps(cfg, cfg.meta.computation, backend or cfg.model.attn_backend, device)
    out.mkdir(parents=True, exist_ok=True)
    written = {"trace": out / "trace.json"}
    for i in range(warmup):
        runner.run(i)
    runner.timer.collect()  # the warm-up done before tracing starts
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        if memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for i in range(warmup, warmup + steps):
            runner.run(i)
            prof.step()
        runner.timer.collect()
    prof.export_chrome_trace(str(written["trace"]))
    if device.type == "cuda" and memory_snapshot:
        written["memory"] = out / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(written["memory"]))
        torch.cuda.memory._record_memory_history(enabled=None)
    table = prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                      row_limit=25)
    written["table"] = out / "ops.txt"
    written["table"].write_text(table)
    return written
