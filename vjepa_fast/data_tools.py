"""Dataset tools behind `vjepa-fast data`: check (would each video load, and how costly is seeking in it) and
transcode (re-encode to a short side and a short keyframe interval: the usual fix for slow NVDEC decoding).

Both probe with dali_pipelines' PyAV probe, so they classify a bad file exactly as the loaders would skip it.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from .dali_pipelines import read_dataset_files
from .dali_pipelines.bad_input import VideoError
from .dali_pipelines.clip_plan import check_size, is_image
from .dali_pipelines.dali_loader import DALI_CODECS
from .dali_pipelines.pyav_decode import probe_video, read_frames
from .dali_pipelines.spec import ClipSpec
from .errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
# Keyframes further apart than a 16x4-frame clip span make every clip decode frames it does not use.
SLOW_SEEK_GAP = 64
DEFAULT_MAX_BYTES = ClipSpec.filter_long_videos  # the official loader's file-size limit (data.filter_long_videos)

# encoder -> (container format, file extension, default constant-quality value (None: the encoder has none))
ENCODERS = {
    "libx264": ("mp4", ".mp4", 23),
    "libvpx-vp9": ("webm", ".webm", 32),
    "mjpeg": ("matroska", ".mkv", None),
}


def _parallel_map(function, items: list, workers: int | None, desc: str) -> list:
    """[function(item) for item in items], in order, over `workers` processes (None: one per core), with a
    progress bar."""
    workers = workers or os.cpu_count() or 1
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap(function, items) if pool else map(function, items)
        return list(tqdm(results, total=len(items), desc=desc, unit="video", dynamic_ncols=True))


# ---- check -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoCheck:
    """What `data check` found for one dataset entry; reason is None for a usable video, else a SKIP_REASONS key."""
    path: str
    label: int
    reason: str | None = None
    detail: str = ""
    codec: str = ""
    width: int = 0
    height: int = 0
    num_frames: int = 0
    fps: float = 0.0
    keyframe_interval: float = 0.0  # mean frames per keyframe
    max_keyframe_gap: int = 0

    @property
    def dali(self) -> str:
        """Where DALI decodes this codec: 'cpu+gpu', 'gpu' or '-'."""
        return "+".join(device for device in ("cpu", "gpu") if self.codec in DALI_CODECS[device]) or "-"


def check_video(entry: tuple[str, int], min_frames: int | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> VideoCheck:
    """Probe a (path, label) entry and decode its first and last frames, as a loader would before using it: a video
    of more than `max_bytes` is too large (data.filter_long_videos), one of fewer than `min_frames` too short."""
    path, label = entry
    try:
        if not is_image(path):
            check_size(path, max_bytes)
        info = probe_video(path)
    except VideoError as error:
        return VideoCheck(path, label, error.reason, error.detail)
    found = VideoCheck(path, label, None, "", info.codec, info.width, info.height, info.num_frames, info.fps,
                       info.num_frames / max(info.num_keyframes, 1), info.max_keyframe_gap)
    if min_frames is not None and info.num_frames < min_frames:
        return dataclasses.replace(found, reason="too_short",
                                   detail=f"{info.num_frames} frames, at least {min_frames} needed")
    try:
        read_frames(path, np.array([0, info.num_frames - 1]), info)
    except VideoError as error:
        return dataclasses.replace(found, reason=error.reason, detail=error.detail)
    return found


def check_dataset(dataset_files: list[str], min_frames: int | None = None, workers: int | None = None,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> list[VideoCheck]:
    """check_video for every entry of the dataset files (a malformed dataset line raises ValueError naming it)."""
    dataset = read_dataset_files(dataset_files)
    entries = list(zip(dataset.paths, dataset.labels.tolist()))
    return _parallel_map(_CheckJob(min_frames, max_bytes), entries, workers, "checking")


@dataclass(frozen=True)
class _CheckJob:
    """check_video with fixed limits, picklable for the process pool."""
    min_frames: int | None
    max_bytes: int

    def __call__(self, entry: tuple[str, int]) -> VideoCheck:
        return check_video(entry, self.min_frames, self.max_bytes)


def format_checks(checks: list[VideoCheck]) -> str:
    """A per-video table, then a summary of what the loaders would skip and why, codecs, and seeking cost."""
    lines = [f"{'status':<12} {'codec':<6} {'size':>9} {'frames':>6} {'fps':>6} {'key int':>7} {'max gap':>7} "
             f"{'DALI':<7} path"]
    for c in checks:
        status = "ok" if c.reason is None else c.reason
        size = f"{c.width}x{c.height}" if c.width else "-"
        lines.append(f"{status:<12} {c.codec or '-':<6} {size:>9} {c.num_frames:>6} {c.fps:>6.2f} "
                     f"{c.keyframe_interval:>7.1f} {c.max_keyframe_gap:>7} {c.dali:<7} {c.path}"
                     + (f"  ({c.detail})" if c.reason else ""))
    bad = [c for c in checks if c.reason is not None]
    usable = [c for c in checks if c.reason is None]
    lines.append("")
    lines.append(f"{len(checks)} videos: {len(usable)} usable, {len(bad)} would be skipped"
                 + (f" ({', '.join(f'{r} {n}' for r, n in Counter(c.reason for c in bad).most_common())})"
                    if bad else ""))
    if usable:
        codecs = Counter(c.codec for c in usable)
        lines.append("codecs: " + ", ".join(f"{codec} {n}" for codec, n in codecs.most_common())
                     + f"; DALI decodes {sum('cpu' in c.dali for c in usable)} on the CPU, "
                       f"{sum('gpu' in c.dali for c in usable)} on the GPU")
        slow = [c for c in usable if c.max_keyframe_gap > SLOW_SEEK_GAP]
        lines.append(f"keyframe gaps: median mean interval {np.median([c.keyframe_interval for c in usable]):.1f}, "
                     f"largest {max(c.max_keyframe_gap for c in usable)} frames"
                     + (f"; {len(slow)} videos have gaps over {SLOW_SEEK_GAP} frames (slow to seek: "
                        f"`vjepa-fast data transcode --gop 16`)" if slow else ""))
    return "\n".join(lines)


def write_checks_csv(checks: list[VideoCheck], path: str) -> None:
    fields = [f.name for f in dataclasses.fields(VideoCheck)] + ["dali"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for c in checks:
            writer.writerow([getattr(c, name) for name in fields])


# ---- transcode -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TranscodeResult:
    dataset_file: str  # the new dataset file (paths relative to its folder)
    transcoded: int
    reused: int  # outputs already there from an earlier run
    failures: list[tuple[str, str, str]]  # (input path, reason, detail), left out of the new dataset file


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at most `short_side` (never upscaled), aspect kept, both even."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def transcode_video(source: str, target: str, short_side: int, gop: int, encoder: str, quality: int | None) -> None:
    """Re-encode the video stream of `source` to `target`: every frame kept at the source frame rate, short side
    `short_side`, a keyframe every `gop` frames, no audio. Written to a temporary name and renamed when complete."""
    container_format, _, _ = ENCODERS[encoder]
    partial = target + ".partial"
    with av.open(source) as source_container, av.open(partial, "w", format=container_format) as output:
        stream = source_container.streams.video[0]
        rate = Fraction(stream.average_rate or stream.guessed_rate or 25).limit_denominator(1001)
        width, height = scaled_size(stream.codec_context.width, stream.codec_context.height, short_side)
        options = {} if quality is None else {"crf": str(quality)}
        if encoder == "libvpx-vp9":
            options.update({"b:v": "0", "deadline": "good", "cpu-used": "5", "row-mt": "1"})
        encoded = output.add_stream(encoder, rate=rate, options=options)
        encoded.width, encoded.height = width, height
        encoded.pix_fmt = "yuvj420p" if encoder == "mjpeg" else "yuv420p"
        encoded.codec_context.gop_size = gop
        for index, frame in enumerate(source_container.decode(stream)):
            frame = frame.reformat(width, height, format=encoded.pix_fmt, interpolation="AREA")
            frame.pts, frame.time_base = index, 1 / rate
            output.mux(encoded.encode(frame))
        output.mux(encoded.encode())
    os.replace(partial, target)


@dataclass(frozen=True)
class _TranscodeJob:
    """Probe then transcode one (source, target) pair; returns (source, reason, detail) or None on success."""
    short_side: int
    gop: int
    encoder: str
    quality: int | None

    def __call__(self, pair: tuple[str, str]) -> tuple[str, str, str] | None:
        source, target = pair
        try:
            probe_video(source)
            transcode_video(source, target, self.short_side, self.gop, self.encoder, self.quality)
            return None
        except VideoError as error:
            failure = source, error.reason, error.detail
        except (av.FFmpegError, OSError) as error:
            failure = source, "undecodable", f"transcoding failed: {error}"
        if os.path.exists(target + ".partial"):
            os.remove(target + ".partial")
        return failure


def dataset_entries(source: str) -> tuple[list[tuple[str, int]], str]:
    """((video path, label) pairs, dataset name) of a dataset file, or of a folder's videos (recursively; label =
    index of the video's folder among the sorted folders, so class-per-folder layouts keep their classes)."""
    if os.path.isfile(source):
        dataset = read_dataset_files([source])
        return list(zip(dataset.paths, dataset.labels.tolist())), Path(source).stem
    if not os.path.isdir(source):
        raise FileNotFoundError(f"no dataset file or folder at {source}")
    videos = sorted(str(p) for p in Path(source).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise UserError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {source}")
    folders = sorted({os.path.dirname(v) for v in videos})
    return [(v, folders.index(os.path.dirname(v))) for v in videos], Path(source).resolve().name


def transcode_dataset(source: str, out_dir: str, *, short_side: int = 256, gop: int = 16, encoder: str = "libx264",
                      quality: int | None = None, workers: int | None = None) -> TranscodeResult:
    """Transcode a dataset file's (or a folder's) videos into out_dir, mirroring their relative layout, and write
    out_dir/<name>.csv listing the transcoded videos with their labels. Outputs already present are reused, so an
    interrupted run continues; videos that cannot be read are left out and returned as failures."""
    if encoder not in ENCODERS:
        raise UserError(f"unknown encoder {encoder!r}: choose one of {', '.join(ENCODERS)}")
    if short_side < 2 or gop < 1:
        raise UserError(f"short side ({short_side}) must be >= 2 and gop ({gop}) >= 1")
    entries, name = dataset_entries(source)
    quality = ENCODERS[encoder][2] if quality is None else quality
    root = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path, _ in entries])
    targets, sources = {}, {}  # input path -> output path relative to out_dir, and back
    for path, _ in entries:
        relative = os.path.splitext(os.path.relpath(os.path.abspath(path), root))[0] + ENCODERS[encoder][1]
        if sources.setdefault(relative, path) != path:
            raise UserError(f"{path} and {sources[relative]} would both be transcoded to {relative}")
        targets[path] = relative
    todo = []
    for path, relative in targets.items():
        target = os.path.join(out_dir, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            todo.append((path, target))
    job = _TranscodeJob(short_side, gop, encoder, quality)
    failures = [failure for failure in _parallel_map(job, todo, workers, "transcoding") if failure is not None]
    failed = {path for path, _, _ in failures}
    dataset_file = os.path.join(out_dir, f"{name}.csv")
    with open(dataset_file, "w") as f:
        f.writelines(f"{targets[path]} {label}\n" for path, label in entries if path not in failed)
    return TranscodeResult(dataset_file, len(todo) - len(failures), len(targets) - len(todo), failures)
