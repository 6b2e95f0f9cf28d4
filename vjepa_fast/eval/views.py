"""Evaluation views: the clips a frozen encoder sees of one video or image, as the official eval loaders make them.

A video gives `num_views` spatial views x `num_segments` temporal segments (the paper's 16x8x3 on K400 is 16
frames, 8 segments, 3 views). Temporal sampling is the official VideoDataset's (allow_clip_overlap=True,
random_clip_sampling=True, train and val alike): a video longer than num_segments clip spans gets one span at a
random place in each of its equal parts; a shorter one gets clip i at i * floor((L - span) / (segments - 1))
with the official linspace indices. Eval views draw their random places from a generator seeded by the file
name, so val features are one fixed draw and can be cached. Crops (official eval transforms): one view resizes
the short side to crop * 256 / 224 (bilinear, no antialiasing, rounded to 8 bits as cv2) and centre-crops;
several views resize the short side to the crop and step along the long side. An image is resized with
antialiasing (PIL bilinear, as torchvision) to crop * 256 / 224, centre-cropped and repeated into a still clip.
Training samples (train_video_clips, train_image_clip: one view) are drawn afresh with the official training
augmentation (augment.py).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..dali_pipelines.bad_input import VideoError
from ..dali_pipelines.pyav_decode import probe_video, read_frames
from ..dali_pipelines.transform import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .augment import (IMAGE_ERASE_ATTEMPTS, VIDEO_ERASE_ATTEMPTS, Rngs, image_crop_flip_augment, rand_augment,
                      random_erase, video_resized_crop)

IMAGE_FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
RESIZE_RATIO = 256 / 224  # single-view eval: short side resized to crop * 256 / 224, then the centre crop


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


def segment_frame_indices(video_frames: int, num_frames: int, frame_step: int, num_segments: int,
                          rng: np.random.RandomState) -> np.ndarray:
    """int64 [num_segments, num_frames]: the official VideoDataset.loadvideo_decord indices (clip overlap
    allowed, random clip places drawn from `rng` when a part holds more than a clip span)."""
    span = num_frames * frame_step
    part = video_frames // num_segments
    clips = []
    for i in range(num_segments):
        if part > span:
            end = rng.randint(span, part)
            indices = np.clip(np.linspace(end - span, end, num=num_frames), end - span, end - 1).astype(np.int64)
            clips.append(indices + i * part)
        else:
            last = min(span, video_frames) - 1
            distinct = last // frame_step
            indices = np.concatenate((np.linspace(0, last, num=distinct), np.full(num_frames - distinct, last)))
            indices = np.clip(indices, 0, max(last - 1, 0)).astype(np.int64)  # (official: -1, the last of 1 frame)
            step = (video_frames - span) // (num_segments - 1) if video_frames > span else 0
            clips.append(indices + i * step)
    return np.stack(clips)


def file_rng(path: str) -> np.random.RandomState:
    """The generator of a file's eval draws: fixed per file name, independent of the split's order."""
    return np.random.RandomState(zlib.crc32(os.path.basename(path).encode()))


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side `short_side` and the long side truncated as the official resizes do."""
    if width < height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def resize_frames(frames: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8-valued float [T, H, W, 3] -> short side `short_side`: bilinear without antialiasing, rounded to
    integers (cv2.resize INTER_LINEAR on uint8 frames, as the official video transforms)."""
    size = resized_size(frames.shape[1], frames.shape[2], short_side)
    if size == tuple(frames.shape[1:3]):
        return frames
    out = F.interpolate(frames.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return out.round_().clamp_(0, 255).permute(0, 2, 3, 1)


def crops(frames: torch.Tensor, crop: int, num_views: int) -> list[torch.Tensor]:
    """Square crops [T, crop, crop, 3] of resized frames [T, H, W, 3]: the centre one (official CenterCrop's
    rounding), or `num_views` stepped by (long - crop) // (views - 1) along the long side (EvalVideoTransform)."""
    height, width = frames.shape[1:3]
    if num_views == 1:
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
        return [frames[:, top:top + crop, left:left + crop]]
    step = (max(height, width) - crop) // (num_views - 1)
    if height > width:
        return [frames[:, i * step:i * step + crop, :crop] for i in range(num_views)]
    return [frames[:, :crop, i * step:i * step + crop] for i in range(num_views)]


def to_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8-valued float [T, S, S, 3] -> normalised float32 [3, T, S, S]."""
    return frames.permute(3, 0, 1, 2).sub(IMAGENET_MEAN).div(IMAGENET_STD).contiguous()


def eval_short_side(spec: ViewSpec) -> int:
    """The official eval resize: crop * 256 / 224 for one view, the crop itself for several."""
    return int(spec.crop_size * RESIZE_RATIO) if spec.num_views == 1 else spec.crop_size


def segment_frames(path: str, spec: ViewSpec, rng: np.random.RandomState) -> np.ndarray:
    """uint8 [num_segments, T, H, W, 3]: the decoded frames of each segment; raises VideoError for an unusable
    file."""
    info = probe_video(path)
    if info.num_frames < 1:
        raise VideoError("too_short", "no frames")
    indices = segment_frame_indices(info.num_frames, spec.num_frames, spec.sampling_rate, spec.num_segments, rng)
    flat = read_frames(path, indices.reshape(-1), info)
    return flat.reshape(*indices.shape, *flat.shape[1:])


def video_views(path: str, spec: ViewSpec) -> torch.Tensor:
    """float32 [num_views, num_segments, 3, T, S, S] of one video; raises VideoError for an unusable file."""
    segments = segment_frames(path, spec, file_rng(path))
    resized = resize_frames(torch.from_numpy(segments.reshape(-1, *segments.shape[2:])).float(),
                            eval_short_side(spec))
    frames = resized.reshape(*segments.shape[:2], *resized.shape[1:])  # [S, T, h, w, 3]
    return torch.stack([torch.stack([to_clip(view) for view in crops(clip, spec.crop_size, spec.num_views)])
                        for clip in frames]).transpose(0, 1).contiguous()


def open_image(path: str) -> Image.Image:
    """The RGB image at `path`; raises VideoError for an unusable file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise VideoError("missing", "no such file") from None
    except OSError as error:
        raise VideoError("undecodable", f"cannot read image: {error}") from None


def image_views(path: str, spec: ViewSpec) -> torch.Tensor:
    """float32 [num_views, 1, 3, T, S, S]: each view of the image repeated into a still clip of T frames."""
    image = open_image(path)
    size = resized_size(image.height, image.width, eval_short_side(spec))
    pixels = np.array(image.resize(size[::-1], Image.BILINEAR))  # antialiased, as torchvision's Resize on PIL
    views = crops(torch.from_numpy(pixels).float()[None], spec.crop_size, spec.num_views)
    return torch.stack([to_clip(v).expand(-1, spec.num_frames, -1, -1) for v in views]).unsqueeze(1)


def train_video_clips(path: str, spec: ViewSpec, rngs: Rngs) -> torch.Tensor:
    """float32 [num_segments, 3, T, S, S]: one training sample of a video, freshly augmented (augment.py; each
    segment independently); raises VideoError for an unusable file."""
    clips = []
    for frames in segment_frames(path, spec, rngs.np):
        frames = rand_augment([Image.fromarray(f) for f in frames], rngs)
        clip = to_clip(torch.from_numpy(np.stack([np.asarray(f) for f in frames])).float())
        clips.append(random_erase(video_resized_crop(clip, spec.crop_size, rngs), VIDEO_ERASE_ATTEMPTS, rngs))
    return torch.stack(clips)


def train_image_clip(path: str, spec: ViewSpec, rngs: Rngs) -> torch.Tensor:
    """float32 [1, 3, T, S, S]: one training sample of an image, freshly augmented (timm's transform, augment.py)
    and repeated into a still clip."""
    image = image_crop_flip_augment(open_image(path), spec.crop_size, rngs)
    clip = random_erase(to_clip(torch.from_numpy(np.array(image)).float()[None]), IMAGE_ERASE_ATTEMPTS, rngs)
    return clip.expand(-1, spec.num_frames, -1, -1)[None]


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
        files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_FOLDER_EXTENSIONS))
        paths += [os.path.join(directory, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_FOLDER_EXTENSIONS)}) under {folder}/<class>/")
    return paths, labels, classes
