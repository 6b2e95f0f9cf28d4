"""Evaluation views: the deterministic clips a frozen encoder sees of one video or image.

A video gives `num_views` spatial views x `num_segments` temporal segments (the paper's 16x8x3 on K400 is 16
frames, 8 segments, 3 views). Segment s is the clip centred in the s-th of `num_segments` equal parts of the video
(the paper draws it at random within the part when training; cached features keep one deterministic draw). The
views are squares of the short side spread evenly along the long side (left/centre/right), as the official
multi-view eval; one view is the centre square, as `ClipSpec(train=False)`. An image is one segment: each view
repeated into a still clip (the paper duplicates images into 16 frames and notes 2 suffice).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..dali_pipelines.bad_input import VideoError
from ..dali_pipelines.pyav_decode import probe_video, read_frames
from ..dali_pipelines.sampling import frame_indices
from ..dali_pipelines.transform import clip_tensor
from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ViewSpec:
    """What one eval sample is: clips of `num_frames` frames `sampling_rate` apart at `crop_size` px,
    `num_segments` per video (concatenated as tokens), `num_views` spatial views (predictions averaged)."""
    num_frames: int
    sampling_rate: int
    crop_size: int
    num_segments: int = 1
    num_views: int = 1

    def __post_init__(self):
        for name in ("num_frames", "sampling_rate", "crop_size", "num_segments", "num_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViewSpec.{name} must be >= 1, got {getattr(self, name)}")


def segment_frame_indices(video_frames: int, num_frames: int, sampling_rate: int, num_segments: int) -> np.ndarray:
    """int64 [num_segments, num_frames]: each segment's clip, a span of num_frames*sampling_rate frames centred on
    the segment's centre and kept inside the video (a video shorter than the span: the whole video, last frame
    repeated, as the training loader does)."""
    span = num_frames * sampling_rate
    clips = []
    for segment in range(num_segments):
        centre = (segment + 0.5) * video_frames / num_segments
        start = min(max(int(round(centre - span / 2)), 0), max(video_frames - span, 0))
        length = min(span, video_frames - start)
        clips.append(start + frame_indices(length, num_frames, sampling_rate, None))
    return np.stack(clips)


def spatial_view_boxes(height: int, width: int, num_views: int) -> list[tuple[int, int, int, int]]:
    """(top, left, side, side) squares of the short side, evenly spaced along the long side (one view: centred)."""
    side = min(height, width)
    slack = max(height, width) - side
    offsets = [slack // 2] if num_views == 1 else [i * slack // (num_views - 1) for i in range(num_views)]
    return [(o, 0, side, side) if height > width else (0, o, side, side) for o in offsets]


def video_views(path: str, spec: ViewSpec) -> torch.Tensor:
    """float32 [num_views, num_segments, 3, T, S, S] of one video; raises VideoError for an unusable file."""
    info = probe_video(path)
    if info.num_frames < spec.num_frames:
        raise VideoError("too_short", f"{info.num_frames} frames, at least {spec.num_frames} needed")
    indices = segment_frame_indices(info.num_frames, spec.num_frames, spec.sampling_rate, spec.num_segments)
    flat = read_frames(path, indices.reshape(-1), info)  # [S*T, H, W, 3]
    frames = flat.reshape(*indices.shape, *flat.shape[1:])
    height, width = frames.shape[2:4]
    return torch.stack([torch.stack([clip_tensor(clip, box, spec.crop_size, flip=False) for clip in frames])
                        for box in spatial_view_boxes(height, width, spec.num_views)])


def image_views(path: str, spec: ViewSpec) -> torch.Tensor:
    """float32 [num_views, 1, 3, T, S, S]: each view of the image repeated into a still clip of T frames."""
    from PIL import Image  # only image evaluation needs Pillow

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise VideoError("missing", "no such file") from None
    except OSError as error:
        raise VideoError("undecodable", f"cannot read image: {error}") from None
    height, width = pixels.shape[:2]
    views = [clip_tensor(pixels[None], box, spec.crop_size, flip=False) for box in
             spatial_view_boxes(height, width, spec.num_views)]  # [3, 1, S, S] each
    return torch.stack([v.expand(-1, spec.num_frames, -1, -1) for v in views]).unsqueeze(1)


def read_image_folder(root: str, split: str, classes: list[str] | None = None) -> tuple[list[str], list[int],
                                                                                        list[str]]:
    """(image paths, labels, class names) of `root/split/<class>/*` (ImageFolder layout; classes sorted by name,
    or the given `classes` so that train and val share one label map)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} not found (expected {root}/train/<class>/ and "
                                f"{root}/val/<class>/)")
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{folder} has classes {unknown} that the train split does not have")
    paths, labels = [], []
    for label, name in enumerate(classes):
        directory = os.path.join(folder, name)
        if not os.path.isdir(directory):
            continue
        files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(directory, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return paths, labels, classes
