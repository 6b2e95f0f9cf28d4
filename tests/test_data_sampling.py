"""Frame indices, crop boxes, clip transform and ClipSpec checked against straightforward transcriptions of the
official V-JEPA code (src/datasets/video_dataset.py, src/datasets/utils/video/transforms.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vjepa_fast.dali_pipelines import ClipSpec
from vjepa_fast.dali_pipelines.sampling import centre_square_box, frame_indices, random_resized_crop_box
from vjepa_fast.dali_pipelines.transform import clip_tensor
from official_transcriptions import official_indices


@pytest.mark.parametrize("fpc,fstp", [(16, 4), (8, 4), (8, 2), (3, 5), (1, 1)])
def test_frame_indices_match_official(fpc, fstp):
    clip_len = fpc * fstp
    for video_len in sorted({1, 2, fstp - 1, fstp, clip_len - 1, clip_len, clip_len + 1, clip_len + 2,
                             2 * clip_len + 7, 300} - {0}):
        for seed in range(5):
            ours = frame_indices(video_len, fpc, fstp, np.random.default_rng(seed))
            end = int(np.random.default_rng(seed).integers(clip_len, video_len)) if video_len > clip_len else None
            expected = official_indices(video_len, fpc, fstp, end)
            assert ours.dtype == np.int64 and ours.shape == (fpc,)
            np.testing.assert_array_equal(ours, expected, err_msg=f"L={video_len} fpc={fpc} fstp={fstp}")


def test_short_video_repeats_last_frame():
    # 10 frames, 8 wanted at stride 4: linspace(0, 10, 2) = [0, 10] -> clipped [0, 9], then 6 copies of frame 9
    np.testing.assert_array_equal(frame_indices(10, 8, 4, np.random.default_rng(0)), [0, 9, 9, 9, 9, 9, 9, 9])


def test_random_end_covers_its_range():
    # L=70, span 64: end in [64, 69], so the first index ranges over 0..5 and the last frame (69) is never used
    firsts = {int(frame_indices(70, 16, 4, np.random.default_rng(seed))[0]) for seed in range(200)}
    assert firsts == set(range(6))


def test_eval_indices_are_the_centred_span():
    indices = frame_indices(100, 16, 4, rng=None)
    np.testing.assert_array_equal(indices, official_indices(100, 16, 4, end_indx=82))  # span 18..81
    np.testing.assert_array_equal(frame_indices(20, 8, 4, rng=None), official_indices(20, 8, 4, None))


class NumpyBackedRandom:
    """python `random`-like uniform/randint drawing from a numpy Generator, to replay the official code."""

    def __init__(self, rng):
        self.rng = rng

    def uniform(self, a, b):
        return self.rng.uniform(a, b)

    def randint(self, a, b):
        return int(self.rng.integers(a, b + 1))


def official_crop_params(scale, ratio, height, width, random):
    """The official _get_param_spatial_crop (num_repeat=10, log_scale=True, switch_hw=False)."""
    for _ in range(10):
        area = height * width
        target_area = random.uniform(*scale) * area
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = random.randint(0, height - h)
            j = random.randint(0, width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


@pytest.mark.parametrize("height,width", [(80, 80), (144, 176), (720, 1280), (50, 100), (100, 30)])
@pytest.mark.parametrize("scale,ratio", [((0.3, 1.0), (0.75, 1.35)), ((1.0, 1.0), (0.75, 1.35)),
                                         ((0.08, 1.0), (3 / 4, 4 / 3))])
def test_crop_box_matches_official(height, width, scale, ratio):
    for seed in range(20):
        ours = random_resized_crop_box(height, width, scale, ratio, np.random.default_rng(seed))
        expected = official_crop_params(scale, ratio, height, width, NumpyBackedRandom(np.random.default_rng(seed)))
        assert ours == expected
        top, left, box_height, box_width = ours
        assert 0 <= top and top + box_height <= height and 0 <= left and left + box_width <= width


def test_crop_box_fallback_is_a_centre_crop_clamped_to_the_ratio():
    # a 2:1 frame cannot hold a full-area box of ratio <= 1.35: all ten tries fail
    assert random_resized_crop_box(50, 100, (1.0, 1.0), (0.75, 1.35), np.random.default_rng(0)) == (0, 16, 50, 68)
    assert centre_square_box(50, 100) == (0, 25, 50, 50)
    assert centre_square_box(81, 40) == (20, 0, 40, 40)


def official_transform(frames, box, crop_size, flip):
    """The official VideoTransform order: float tensor, permute to C T H W, crop, resize, flip, normalise."""
    buffer = torch.tensor(frames, dtype=torch.float32).permute(3, 0, 1, 2)
    i, j, h, w = box
    buffer = F.interpolate(buffer[:, :, i:i + h, j:j + w], size=(crop_size, crop_size), mode="bilinear",
                           align_corners=False)
    if flip:
        buffer = buffer.flip(-1)
    mean = torch.tensor((0.485, 0.456, 0.406)) * 255.0
    std = torch.tensor((0.229, 0.224, 0.225)) * 255.0
    C, T, H, W = buffer.shape
    buffer = buffer.reshape(C, -1).permute(1, 0).sub(mean).div(std)
    return buffer.permute(1, 0).reshape(C, T, H, W)


@pytest.mark.parametrize("flip", [False, True])
def test_clip_tensor_matches_official_transform(flip):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 37, 53, 3), dtype=np.uint8)
    for seed in range(4):
        box = random_resized_crop_box(37, 53, (0.3, 1.0), (0.75, 1.35), np.random.default_rng(seed))
        ours = clip_tensor(frames, box, 24, flip)
        assert ours.dtype == torch.float32 and ours.shape == (3, 5, 24, 24)
        torch.testing.assert_close(ours, official_transform(frames, box, 24, flip), rtol=0, atol=1e-5)


def test_flip_mirrors_and_full_box_is_a_plain_resize():
    frames = np.random.default_rng(1).integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    box = (0, 0, 20, 20)
    torch.testing.assert_close(clip_tensor(frames, box, 12, True), clip_tensor(frames, box, 12, False).flip(-1))
    plain = F.interpolate(torch.from_numpy(frames).float().permute(3, 0, 1, 2), size=(12, 12), mode="bilinear",
                          align_corners=False)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1, 1) * 255
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1, 1) * 255
    torch.testing.assert_close(clip_tensor(frames, box, 12, False), (plain - mean) / std)
    # the mean colour normalises to zero
    mean_frames = np.broadcast_to(np.array([0.485, 0.456, 0.406]) * 255, (1, 4, 4, 3))
    exact = clip_tensor(mean_frames.astype(np.float32), (0, 0, 4, 4), 4, False)
    torch.testing.assert_close(exact, torch.zeros_like(exact))


def test_clip_spec_validates_and_normalises():
    spec = ClipSpec(random_resize_scale=[0.5, 1], random_resize_aspect_ratio=[1, 1])
    assert spec.random_resize_scale == (0.5, 1.0) and hash(spec)
    assert (spec.min_frames, spec.filter_short_videos, spec.filter_long_videos) == (None, False, 10**9)
    assert spec.frame_step(30) == 4 and ClipSpec(fps=4).frame_step(29.97) == 7
    assert ClipSpec(num_frames=8, duration=2).frame_step(30) == 7 and ClipSpec(duration=2).frame_step(30, 4) == 15
    with pytest.raises(ValueError, match="fps=4 or duration=2"):
        ClipSpec(fps=4, duration=2)
    with pytest.raises(ValueError, match="duration"):
        ClipSpec(duration=0)
    with pytest.raises(ValueError, match="num_frames"):
        ClipSpec(num_frames=0)
    with pytest.raises(ValueError, match="random_resize_scale"):
        ClipSpec(random_resize_scale=(0.9, 0.3))
    with pytest.raises(ValueError, match="min_frames"):
        ClipSpec(min_frames=0)
