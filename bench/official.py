"""The official V-JEPA training iteration, timed on the same machine as ours, with its MFU from our FLOP count.

    python -m bench.official --official DIR [--config vitl16] [--batch 24] [--peak-tflops X] [--out bench/out]

DIR holds `jepa_step.py`, a timing harness of one official training iteration (the official train_step, optimizer,
GradScaler, per-parameter EMA loop and per-step logging syncs) on synthetic clips, beside the official source in
DIR/jepa. This project contains no official code: DIR is the user's copy. The harness runs in a subprocess with the
settings of our config (model, batch, frames, crop, patch, tubelet, predictor, dtype), the clips in pinned host
memory copied each step and gradient clipping on, as our step benchmark runs. Its printed per-iteration times and
mask sizes give ms/iter (median), clips/s, and TFLOP/s and MFU through bench/flops.py, the count our own MFU uses.
Writes official.json under --out.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from vjepa_fast.bench.ceilings import matmul_tflops
from vjepa_fast.bench.flops import step_flops
from vjepa_fast.bench.report import write_results
from vjepa_fast.config import Config, load_config, official_masks
from vjepa_fast.models.build import MODEL_SIZES
from vjepa_fast.step import compute_dtype, pick_device

# The harness draws the masks of configs/pretrain/vitl16.yaml, whatever the model.
HARNESS_MASKS = official_masks()
TIMED_LINE = re.compile(r"\[timed\s+\d+\] loss=(?P<loss>\S+) step=\s*(?P<ms>[\d.]+) ms.*"
                        r"ctx_tokens=\[(?P<ctx>[\d, ]+)\] pred_tokens=\[(?P<pred>[\d, ]+)\]")
PEAK_MEMORY = re.compile(r"peak mem allocated: (?P<gib>[\d.]+) GiB")


def harness_args(cfg: Config, device: torch.device, steps: int, warmup: int) -> list[str]:
    """jepa_step.py's arguments for `cfg`; refuses what the harness cannot build (custom sizes, other masks)."""
    m, d = cfg.model, cfg.data
    name = m.model_name
    if cfg.encoder_size != MODEL_SIZES[name]:
        raise ValueError(f"the official harness builds named models only: {cfg.name}'s encoder "
                         f"{cfg.encoder_size} is not {name}'s {MODEL_SIZES[name]} (unset model.embed_dim, depth, "
                         f"num_heads and mlp_ratio)")
    if [(k.num_blocks, k.spatial_scale, k.temporal_scale, k.aspect_ratio) for k in cfg.mask] != \
            [(k.num_blocks, k.spatial_scale, k.temporal_scale, k.aspect_ratio) for k in HARNESS_MASKS]:
        raise ValueError("the official harness draws the masks of the official vitl16 config (8 blocks at 0.15, "
                         f"2 at 0.7); {cfg.name} has others")
    dtype = str(compute_dtype(cfg, device)).removeprefix("torch.")
    return ["--device", str(device), "--model", name, "--batch-size", str(d.batch_size),
            "--num-frames", str(d.num_frames), "--crop-size", str(d.crop_size), "--patch-size", str(d.patch_size),
            "--tubelet-size", str(d.tubelet_size), "--pred-depth", str(m.pred_depth),
            "--pred-embed-dim", str(m.pred_embed_dim), "--dtype", dtype, "--iters", str(steps),
            "--warmup", str(warmup), "--clip-grad", "--host-data"]


def parse(output: str) -> tuple[list[tuple[float, list[int], list[int]]], float | None]:
    """([(ms, context tokens per mask, predicted tokens per mask)] of the timed iterations, peak GiB or None)."""
    timed = [(float(m["ms"]), [int(x) for x in m["ctx"].split(",")], [int(x) for x in m["pred"].split(",")])
             for m in TIMED_LINE.finditer(output)]
    peak = PEAK_MEMORY.search(output)
    return timed, float(peak["gib"]) if peak else None


def run(cfg: Config, official: Path, *, device="auto", steps: int = 10, warmup: int = 3,
        peak_tflops: float | None = None) -> dict:
    """Run the official harness for `cfg` and summarise it like a variant of `vjepa-fast bench step`."""
    harness = Path(official) / "jepa_step.py"
    if not harness.is_file():
        raise FileNotFoundError(f"--official {official}: no jepa_step.py there (a copy of the folder holding it and "
                                f"the official source in jepa/)")
    device = pick_device(device)
    command = [sys.executable, str(harness), *harness_args(cfg, device, steps, warmup)]
    print("official:", " ".join(command), flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:  # streamed, so a run cut short still shows how far it got
        print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    output = "".join(lines)
    timed, peak_gib = parse(output)
    if code != 0 or not timed:
        raise RuntimeError(f"the official harness exited with status {code} after {len(timed)} timed iterations; "
                           f"last output: {output[-500:]}")
    dtype = compute_dtype(cfg, device)
    peak = peak_tflops if peak_tflops is not None else matmul_tflops(device, dtype)
    ms = [t for t, _, _ in timed]
    flops = [step_flops(cfg, ctx, pred).total for _, ctx, pred in timed]  # the same count as ours
    tflops = sum(flops) / (sum(ms) / 1e3) / 1e12
    step_ms = statistics.median(ms)
    return {"config": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "command": command, "batch": cfg.data.batch_size, "dtype": str(dtype).replace("torch.", ""),
            "steps": len(timed), "warmup": warmup, "step_ms": step_ms,
            "clips_per_s": cfg.data.batch_size / step_ms * 1e3,
            "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak, "peak_mem_gb": peak_gib,
            "ms_per_iter": "median wall time of one official iteration (clip copy from pinned memory, masks to the "
                           "device, train_step with its per-step logging syncs); mask collation not included"}


def markdown(r: dict) -> str:
    mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
    return (f"Official V-JEPA step, {r['config']} on {r['device']} ({r['dtype']}, batch {r['batch']}, "
            f"{r['steps']} timed iterations): {r['step_ms']:.1f} ms/iter, {r['clips_per_s']:.1f} clips/s, "
            f"{r['tflops']:.3g} TFLOP/s, MFU {r['mfu']:.1%} of {r['peak_tflops']:.3g}, peak {mem} GiB\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="the folder holding jepa_step.py and the official jepa/")
    p.add_argument("--config", default="vitl16", help="our config whose settings the official step runs with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="the peak for MFU (default: measured with a large matmul)")
    p.add_argument("--out", default="bench/out")
    a = p.parse_args(argv)
    overrides = [*a.overrides, *([f"data.batch_size={a.batch}"] if a.batch else [])]
    result = run(load_config(a.config, overrides), Path(a.official), device=a.device, steps=a.steps,
                 warmup=a.warmup, peak_tflops=a.peak_tflops)
    write_results(a.out, "official", result, markdown(result))
    print(markdown(result), end="")
    return result


if __name__ == "__main__":
    main()
