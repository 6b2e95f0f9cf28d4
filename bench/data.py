"""Data pipeline speed: clips/s of each loader on the same VP9 files, next to a decode-everything baseline.

    python -m bench.data [--out bench/out] [--videos 16] [--frames 300] [--size 256x340] [--workers 2]
                         [--step-clips-per-s X]

Loaders: pyav (the CPU loader), dali-cpu (when DALI is installed), dali-gpu (when DALI and CUDA are there), and the
baseline: a PyAV loader that decodes every frame of the clip's span at full resolution into float32 and crops and
resizes afterwards (the official approach; same seeking, same workers, same clips). Each runs one warm-up batch
(workers start, files are probed) and is then timed over --batches batches, in --rounds alternating rounds: clips/s
are medians over rounds, speed-ups medians of per-round ratios (robust to a shared machine's changing load).
Targets (docs/design.md, section 7): CPU loader >= 2x the baseline; on a GPU, DALI GPU clips/s above what the fast
training step consumes (--step-clips-per-s, from the step benchmark). Writes data.json and data.md under --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vjepa_fast.bench.report import write_results
from vjepa_fast.dali_pipelines import ClipSpec, StepLoader, read_dataset_files
from vjepa_fast.dali_pipelines.choose import dali_installed
from vjepa_fast.dali_pipelines.clip_plan import ClipPlan
from vjepa_fast.dali_pipelines.dali_loader import DaliClipLoader
from vjepa_fast.dali_pipelines.loader import ClipDataset, PyAVClipLoader
from vjepa_fast.dali_pipelines.pyav_decode import read_frames
from vjepa_fast.dali_pipelines.transform import IMAGENET_MEAN, IMAGENET_STD
from vjepa_fast.synthetic import FPS, KEYFRAME_INTERVAL, write_webm


def write_videos(folder: str, count: int, frames: int, height: int, width: int, cell: int) -> str:
    """`count` VP9 videos (synthetic.write_webm: 16 fps, keyframe every 16 frames) panning one pixel per frame over
    a smooth random texture (random colours every `cell` pixels, bicubic in between: the smaller the cell, the more
    detail and bits), and their dataset file."""
    lines = []
    for index in range(count):
        rng = np.random.default_rng(index)
        cells = torch.from_numpy(rng.uniform(0, 255, (1, 3, height // cell + 2, (width + frames) // cell + 2)))
        texture = F.interpolate(cells, scale_factor=cell, mode="bicubic", align_corners=False)[0]
        texture = texture.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
        write_webm(os.path.join(folder, f"{index:03d}.webm"),
                   np.stack([texture[:height, t:t + width] for t in range(frames)]))
        lines.append(f"{index:03d}.webm {index}\n")
    dataset_file = os.path.join(folder, "bench.csv")
    Path(dataset_file).write_text("".join(lines))
    return dataset_file


class FullSpanClips(ClipDataset):
    """The baseline's clips: the same plans as the loaders, but every frame of the span decoded, converted to
    float32 at full resolution, and only then subsampled, cropped and resized."""

    def decode(self, plan: ClipPlan) -> torch.Tensor:
        first, last = int(plan.frames[0]), int(plan.frames[-1])
        span = torch.from_numpy(read_frames(plan.path, np.arange(first, last + 1), plan.info)).float()
        top, left, height, width = plan.box
        clip = span[plan.frames - first].permute(3, 0, 1, 2)[:, :, top:top + height, left:left + width]
        clip = F.interpolate(clip, size=(self.spec.crop_size,) * 2, mode="bilinear", align_corners=False)
        clip = clip.flip(-1) if plan.flip else clip
        return (clip - IMAGENET_MEAN) / IMAGENET_STD


class BaselineLoader(PyAVClipLoader):
    """The PyAV loader's stream, decoding FullSpanClips."""
    clip_dataset = FullSpanClips


LOADER_CLASSES = {"pyav": PyAVClipLoader, "baseline": BaselineLoader, "dali-cpu": DaliClipLoader,
                  "dali-gpu": DaliClipLoader}


def open_loader(name: str, dataset_file: str, spec: ClipSpec, batch_size: int, workers: int) -> StepLoader:
    arguments = dict(batch_size=batch_size, seed=0, start_step=0, rank=0, world_size=1, num_workers=workers)
    if name.startswith("dali"):
        arguments["device"] = name.split("-")[1]
    return LOADER_CLASSES[name](read_dataset_files([dataset_file]), spec, **arguments)


def clips_per_second(batches, batch_size: int, count: int) -> float:
    """Clips/s over `count` batches after one warm-up batch."""
    next(batches)
    start = time.perf_counter()
    for _ in range(count):
        clips = next(batches)[0]
    if clips.is_cuda:
        torch.cuda.synchronize()
    return count * batch_size / (time.perf_counter() - start)


def run(args) -> dict:
    spec = ClipSpec(num_frames=args.num_frames, sampling_rate=args.sampling_rate, crop_size=args.crop_size)
    height, width = (int(v) for v in args.size.split("x"))
    loaders = ["pyav", "baseline"] + (["dali-cpu"] if dali_installed() else []) \
        + (["dali-gpu"] if dali_installed() and torch.cuda.is_available() else [])
    rates = {name: [] for name in loaders}  # clips/s per round
    with tempfile.TemporaryDirectory() as folder:
        dataset_file = write_videos(folder, args.videos, args.frames, height, width, args.texture_cell)
        seconds = args.frames / FPS
        kbits_per_s = sum(os.path.getsize(p) for p in read_dataset_files([dataset_file]).paths) * 8e-3 \
            / (args.videos * seconds)
        for round_number in range(args.rounds):
            for name in loaders:
                loader = open_loader(name, dataset_file, spec, args.batch_size, args.workers)
                try:
                    rates[name].append(clips_per_second(loader, args.batch_size, args.batches))
                finally:
                    loader.close()
                print(f"round {round_number}: {name} {rates[name][-1]:.1f} clips/s", flush=True)
    # medians over rounds; a speed-up is the median of per-round ratios, each taken within seconds, so a shared
    # machine's changing load affects both sides of it alike
    results = {name: round(statistics.median(values), 2) for name, values in rates.items()}
    speedups = {name: round(statistics.median(a / b for a, b in zip(values, rates["baseline"])), 2)
                for name, values in rates.items()}
    report = {"videos": args.videos, "frames": args.frames, "size": args.size, "codec": "vp9", "fps": FPS,
              "keyframe_interval": KEYFRAME_INTERVAL, "texture_cell": args.texture_cell,
              "kbits_per_s": round(kbits_per_s), "clip": f"{spec.num_frames}x{spec.sampling_rate} -> {spec.crop_size}",
              "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds, "workers": args.workers,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "cpu_cores": os.cpu_count(), "load_average": os.getloadavg()[0], "clips_per_s": results,
              "clips_per_s_by_round": rates, "speedup_vs_baseline": speedups}
    if args.step_clips_per_s:
        report["step_clips_per_s"] = args.step_clips_per_s
        report["vs_step"] = {name: round(value / args.step_clips_per_s, 2) for name, value in results.items()}
    return report


def markdown(report: dict) -> str:
    lines = [f"Data loaders, {report['videos']} VP9 videos of {report['frames']} frames at {report['size']} "
             f"({report['kbits_per_s']} kb/s, keyframe every {report['keyframe_interval']}), clip {report['clip']}, "
             f"batch {report['batch_size']}, {report['workers']} workers, {report['rounds']} rounds, "
             f"{report['device']} ({report['cpu_cores']} CPU cores, load average {report['load_average']:.1f})", "",
             "| loader | clips/s | vs baseline |" + (" vs step |" if "vs_step" in report else ""),
             "|---|---|---|" + ("---|" if "vs_step" in report else "")]
    for name, value in report["clips_per_s"].items():
        row = f"| {name} | {value:.1f} | {report['speedup_vs_baseline'][name]:.2f}x |"
        lines.append(row + (f" {report['vs_step'][name]:.2f}x |" if "vs_step" in report else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--frames", type=int, default=300, help="frames per video (300: a 10 s Kinetics clip at 30 fps)")
    p.add_argument("--size", default="256x340", help="HxW of the videos (256x340: Kinetics at short side 256)")
    p.add_argument("--texture-cell", type=int, default=8,
                   help="px between random texture colours: less, more detail and bits (8)")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--sampling-rate", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=8, help="timed batches per loader (after one warm-up batch)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds over all loaders (medians are reported)")
    p.add_argument("--workers", type=int, default=2, help="PyAV/baseline worker processes, DALI threads")
    p.add_argument("--step-clips-per-s", type=float, help="clips/s the training step consumes (bench step)")
    args = p.parse_args(argv)
    report = run(args)
    table = markdown(report)
    written = write_results(args.out, "data", report, table)
    print(table + f"written {written['json']} and {written['md']}")
    return report


if __name__ == "__main__":
    main()
