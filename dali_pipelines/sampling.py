"""Per-clip random choices, as the official V-JEPA loader makes them: which frames, and which crop box."""
import math

import numpy as np


def frame_indices(video_frames: int, num_frames: int, sampling_rate: int,
                  rng: np.random.Generator | None) -> np.ndarray:
    """Indices (int64 [num_frames]) of a clip's frames in a video of `video_frames` frames.

    A span of num_frames * sampling_rate frames ending at a random point (or centred when rng is None, for eval) is
    covered by a linspace; a video no longer than the span is covered whole with its last frame repeated
    (official video_dataset.py with num_clips=1, allow_clip_overlap=False).
    """
    clip_len = num_frames * sampling_rate
    if video_frames > clip_len:
        if rng is None:
            end = (video_frames + clip_len) // 2
        else:
            end = int(rng.integers(clip_len, video_frames))  # exclusive high, as np.random.randint
        start = end - clip_len
        indices = np.clip(np.linspace(start, end, num=num_frames), start, end - 1)
    else:
        covered = video_frames // sampling_rate
        indices = np.concatenate([np.linspace(0, video_frames, num=covered),
                                  np.full(num_frames - covered, video_frames)])
        indices = np.clip(indices, 0, video_frames - 1)
    return indices.astype(np.int64)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, box_height, box_width) of an Inception-style random crop (official _get_param_spatial_crop).

    Ten tries of an area fraction U(scale) and a log-uniform aspect ratio; the first box that fits wins, else a
    centre crop clamped to the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        box_width = int(round(math.sqrt(target_area * aspect_ratio)))
        box_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    return fallback_crop_box(height, width, ratio)


def fallback_crop_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the random-resized crop when no random box fits (torchvision's fallback, as
    the official transforms): the whole frame, cut to the nearest aspect ratio in `ratio`, centred."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_width, box_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        box_width, box_height = int(round(height * max(ratio))), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def centre_square_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, side, side) of the largest centred square. Resized to the crop size it is the eval view: the
    short side resized to the crop size, then centre-cropped (up to the rounding of the resized long side)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side
