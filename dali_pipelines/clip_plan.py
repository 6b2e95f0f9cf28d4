"""Every choice that makes a clip, taken before decoding: which video (bad ones replaced by fresh draws), which
frames (the official V-JEPA indices), which crop box, whether to flip. The PyAV and the DALI loader both take their
clips from here, so for the same (seed, stream position) they pick the same video, frames, box and flip.
"""
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..errors import RunStopped
from .bad_input import VideoError, describe_failures
from .dataset_file import DatasetIndex
from .pyav_decode import VideoInfo, probe_video
from .sample_order import CLIP_STREAM
from .sampling import centre_square_box, frame_indices, random_resized_crop_box
from .spec import ClipSpec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")  # dataset entries read as images (official video_dataset.py)
# Draws tried for one batch slot before giving up (all bad: the dataset is mostly unusable).
MAX_DRAWS_PER_CLIP = 32

Loaded = TypeVar("Loaded")


@dataclass(frozen=True)
class ClipPlan:
    """One clip of `path`: frame indices (int64 [T], presentation order), crop box (top, left, height, width) in the
    full frame, and a horizontal flip."""
    path: str
    info: VideoInfo
    frames: np.ndarray
    box: tuple[int, int, int, int]
    flip: bool


def is_image(path: str) -> bool:
    """Whether a dataset entry is an image, by its extension as the official loader tells them (jpg, jpeg, png)."""
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def plan_clip(path: str, spec: ClipSpec, rng: np.random.Generator, source: int = 0) -> ClipPlan:
    """Probe `path` (an entry of dataset file `source`) and draw its clip's frames, box and flip from `rng` (none
    drawn in eval mode); raises VideoError for a file the spec skips or that cannot be used.

    As the official V-JEPA 2 loader: an image is a clip of that image repeated; a video shorter than the clip's
    span is sampled whole with its last frame repeated (frame_indices), unless spec.filter_short_videos."""
    num_frames = spec.frames_for(source)
    image = is_image(path)
    if not image:  # the official size filter skips videos only
        check_size(path, spec.filter_long_videos)
    info = probe_video(path)
    if image:
        frames = np.zeros(num_frames, dtype=np.int64)
    else:
        step = spec.frame_step(info.fps, num_frames)
        if step < 1:
            why = f"{info.fps:g} fps, too slow for" if info.fps > 0 else "no frame rate in the file, needed for"
            raise VideoError("unsupported", f"{why} {num_frames}-frame clips {_clip_timing(spec)}")
        shortest = max(spec.min_frames or 0, num_frames * step if spec.filter_short_videos else 0)
        if info.num_frames < shortest:
            raise VideoError("too_short", f"{info.num_frames} frames, at least {shortest} needed")
        frames = frame_indices(info.num_frames, num_frames, step, rng if spec.train else None)
    if not spec.train:
        return ClipPlan(path, info, frames, centre_square_box(info.height, info.width), False)
    box = random_resized_crop_box(info.height, info.width, spec.random_resize_scale,
                                  spec.random_resize_aspect_ratio, rng)
    flip = spec.horizontal_flip and rng.uniform() < 0.5
    return ClipPlan(path, info, frames, box, bool(flip))


def check_size(path: str, limit: int) -> None:
    """Raise 'too_large' for a file of more than `limit` bytes (a missing file is left to the probe to name)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size > limit:
        raise VideoError("too_large", f"{size} bytes, more than the {limit} of data.filter_long_videos")


def _clip_timing(spec: ClipSpec) -> str:
    return f"sampled at {spec.fps:g} fps" if spec.fps is not None else f"spanning {spec.duration:g} s"


def load_first_usable(dataset: DatasetIndex, spec: ClipSpec, seed: int, key: tuple[int, int],
                      load: Callable[[ClipPlan], Loaded]) -> tuple[Loaded, int, list]:
    """(load(plan), label, attempts) for the stream slot key = (global sample position, dataset index).

    Attempt a draws from a generator seeded by (seed, position, a); a video that fails to probe or load (VideoError)
    is replaced by a fresh draw from the next attempt's generator. `attempts` lists (dataset index, skip reason or
    None, detail) of every video tried, for the SkipTracker.
    """
    position, index = key
    attempts = []
    for attempt in range(MAX_DRAWS_PER_CLIP):
        rng = np.random.default_rng((seed, CLIP_STREAM, position, attempt))
        if attempt > 0:
            index = int(rng.choice(len(dataset), p=dataset.probabilities))
        try:
            loaded = load(plan_clip(dataset.paths[index], spec, rng, int(dataset.sources[index])))
        except VideoError as error:
            attempts.append((index, error.reason, error.detail))
            continue
        attempts.append((index, None, None))
        return loaded, int(dataset.labels[index]), attempts
    failures = list(dict.fromkeys((dataset.paths[i], reason, detail) for i, reason, detail in attempts))
    raise RunStopped(f"{MAX_DRAWS_PER_CLIP} videos drawn in a row are unusable; check the dataset files:\n"
                     f"{describe_failures(failures)}")
