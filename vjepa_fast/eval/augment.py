"""Training-time augmentations of the official frozen evals, drawn from explicit generators (reproducible per
epoch and item, in any worker).

Video (evals/video_classification_frozen/utils.py VideoTransform(training=True), V-JEPA 1 and 2): RandAugment
`rand-m7-n4-mstd0.5-inc1` on the decoded frames (one draw per clip, applied to every frame; bicubic, grey fill),
then a random-resized crop (scale 0.08-1, ratio 3/4-4/3, bilinear) to the crop size, no flip, and random erasing
(p 0.25, one box for all frames, per-pixel normal noise). Each segment of a video is augmented independently.
Image (evals/image_classification_frozen/eval.py: timm's create_transform with auto_augment='original',
bicubic, re_prob 0.25): random-resized crop (bicubic), horizontal flip, AutoAugment 'original', random erasing.
The ops are PIL's, as the official code's (src/datasets/utils/video/randaugment.py, randerase.py, timm).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from ..dali_pipelines.sampling import fallback_crop_box

MAX_LEVEL = 10.0
VIDEO_FILL = (128, 128, 128)  # the video RandAugment's fill (no img_mean given)
IMAGE_FILL = tuple(min(255, round(255 * m)) for m in (0.485, 0.456, 0.406))  # timm: the ImageNet mean
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
ERASE_PROB = 0.25
VIDEO_ERASE_ATTEMPTS, IMAGE_ERASE_ATTEMPTS = 100, 10  # randerase.py's cube erasing tries 100 boxes, timm's 10
RAND_MAGNITUDE, RAND_LAYERS, RAND_MAGNITUDE_STD = 7, 4, 0.5  # rand-m7-n4-mstd0.5-inc1


@dataclass
class Rngs:
    """The three generators the official transforms draw from: Python's, NumPy's and torch's."""
    py: random.Random
    np: np.random.RandomState
    torch: torch.Generator

    @classmethod
    def seeded(cls, seed: int) -> "Rngs":
        return cls(random.Random(seed), np.random.RandomState(seed % 2 ** 32), torch.Generator().manual_seed(seed))


def _affine(img, matrix, resample, fill):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3) if img.mode == "RGB" else img


OPS = {  # name -> op(img, *args, resample, fill)
    "AutoContrast": lambda img, resample, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, resample, fill: ImageOps.equalize(img),
    "Invert": lambda img, resample, fill: ImageOps.invert(img),
    "Rotate": lambda img, deg, resample, fill: img.rotate(deg, resample=resample, fillcolor=fill),
    "Posterize": lambda img, bits, resample, fill: img if bits >= 8 else ImageOps.posterize(img, bits),
    "Solarize": lambda img, thresh, resample, fill: ImageOps.solarize(img, thresh),
    "SolarizeAdd": lambda img, add, resample, fill: _solarize_add(img, add),
    "Color": lambda img, f, resample, fill: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f, resample, fill: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f, resample, fill: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f, resample, fill: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": lambda img, f, resample, fill: _affine(img, (1, f, 0, 0, 1, 0), resample, fill),
    "ShearY": lambda img, f, resample, fill: _affine(img, (1, 0, 0, f, 1, 0), resample, fill),
    "TranslateXRel": lambda img, pct, resample, fill: _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), resample, fill),
    "TranslateYRel": lambda img, pct, resample, fill: _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), resample, fill),
}


def _negate(value: float, py: random.Random) -> float:
    return -value if py.random() > 0.5 else value


def _enhance(m, py):
    return (m / MAX_LEVEL * 1.8 + 0.1,)


def _enhance_increasing(m, py):
    return (1.0 + _negate(m / MAX_LEVEL * 0.9, py),)


LEVELS = {  # op name -> (base op, magnitude -> args), as randaugment.py's LEVEL_TO_ARG
    "AutoContrast": ("AutoContrast", None),
    "Equalize": ("Equalize", None),
    "Invert": ("Invert", None),
    "Rotate": ("Rotate", lambda m, py: (_negate(m / MAX_LEVEL * 30.0, py),)),
    "PosterizeIncreasing": ("Posterize", lambda m, py: (4 - int(m / MAX_LEVEL * 4),)),
    "PosterizeOriginal": ("Posterize", lambda m, py: (int(m / MAX_LEVEL * 4) + 4,)),
    "Solarize": ("Solarize", lambda m, py: (int(m / MAX_LEVEL * 256),)),
    "SolarizeIncreasing": ("Solarize", lambda m, py: (256 - int(m / MAX_LEVEL * 256),)),
    "SolarizeAdd": ("SolarizeAdd", lambda m, py: (int(m / MAX_LEVEL * 110),)),
    "Color": ("Color", _enhance),
    "ColorIncreasing": ("Color", _enhance_increasing),
    "Contrast": ("Contrast", _enhance),
    "ContrastIncreasing": ("Contrast", _enhance_increasing),
    "Brightness": ("Brightness", _enhance),
    "BrightnessIncreasing": ("Brightness", _enhance_increasing),
    "Sharpness": ("Sharpness", _enhance),
    "SharpnessIncreasing": ("Sharpness", _enhance_increasing),
    "ShearX": ("ShearX", lambda m, py: (_negate(m / MAX_LEVEL * 0.3, py),)),
    "ShearY": ("ShearY", lambda m, py: (_negate(m / MAX_LEVEL * 0.3, py),)),
    "TranslateXRel": ("TranslateXRel", lambda m, py: (_negate(m / MAX_LEVEL * 0.45, py),)),
    "TranslateYRel": ("TranslateYRel", lambda m, py: (_negate(m / MAX_LEVEL * 0.45, py),)),
}

RAND_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

AUTO_AUGMENT_ORIGINAL = (  # timm auto_augment_policy_original: (op, probability, magnitude) pairs
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)), (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def augment_op(frames: list, name: str, prob: float, magnitude: float, magnitude_std: float, fill,
               rngs: Rngs) -> list:
    """One AugmentOp: with probability `prob`, op `name` at a (noisy) magnitude, the same on every frame."""
    if prob < 1.0 and rngs.py.random() > prob:
        return frames
    if magnitude_std > 0:
        magnitude = rngs.py.gauss(magnitude, magnitude_std)
    magnitude = min(MAX_LEVEL, max(0.0, magnitude))
    op, level = LEVELS[name]
    args = level(magnitude, rngs.py) if level else ()
    return [OPS[op](img, *args, resample=Image.BICUBIC, fill=fill) for img in frames]


def rand_augment(frames: list, rngs: Rngs) -> list:
    """The video RandAugment: RAND_LAYERS ops drawn with replacement, each applied with probability 0.5."""
    for index in rngs.np.choice(len(RAND_INCREASING), RAND_LAYERS):
        frames = augment_op(frames, RAND_INCREASING[index], 0.5, RAND_MAGNITUDE, RAND_MAGNITUDE_STD, VIDEO_FILL, rngs)
    return frames


def auto_augment(img, rngs: Rngs):
    """timm AutoAugment 'original': a random sub-policy, its two ops in turn."""
    for name, prob, magnitude in rngs.py.choice(AUTO_AUGMENT_ORIGINAL):
        img, = augment_op([img], name, prob, magnitude, 0.0, IMAGE_FILL, rngs)
    return img


def rrc_box(height: int, width: int, rngs: Rngs, *, video: bool) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style random crop (10 tries, then the central crop at the closest
    ratio). `video`: the video version (draws, and ignores, an unused height/width switch; refuses empty boxes)."""
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target_area = rngs.py.uniform(*RRC_SCALE) * area
        aspect = math.exp(rngs.py.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if video:
            rngs.np.uniform()
        if (0 < w or not video) and w <= width and (0 < h or not video) and h <= height:
            return rngs.py.randint(0, height - h), rngs.py.randint(0, width - w), h, w
    return fallback_crop_box(height, width, RRC_RATIO)


def video_resized_crop(clip: torch.Tensor, crop: int, rngs: Rngs) -> torch.Tensor:
    """The video random-resized crop of a normalised clip [3, T, H, W] to [3, T, crop, crop] (bilinear)."""
    top, left, h, w = rrc_box(clip.shape[2], clip.shape[3], rngs, video=True)
    return F.interpolate(clip[:, :, top:top + h, left:left + w], size=(crop, crop), mode="bilinear",
                         align_corners=False)


def image_crop_flip_augment(img, crop: int, rngs: Rngs):
    """timm's training transform of an RGB PIL image up to ToTensor: random-resized crop (bicubic), horizontal
    flip (p 0.5), AutoAugment 'original'."""
    top, left, h, w = rrc_box(img.height, img.width, rngs, video=False)
    img = img.crop((left, top, left + w, top + h)).resize((crop, crop), Image.BICUBIC)
    if torch.rand(1, generator=rngs.torch) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return auto_augment(img, rngs)


def random_erase(clip: torch.Tensor, attempts: int, rngs: Rngs) -> torch.Tensor:
    """Random erasing of clip [C, T, H, W] in place: with probability ERASE_PROB one box (area 2-33 %, aspect
    0.3-3.3, `attempts` tries) on every frame, fresh normal noise per frame."""
    if rngs.py.random() > ERASE_PROB:
        return clip
    C, T, H, W = clip.shape
    for _ in range(attempts):
        target_area = rngs.py.uniform(0.02, 1 / 3) * H * W
        aspect = math.exp(rngs.py.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w < W and h < H:
            top, left = rngs.py.randint(0, H - h), rngs.py.randint(0, W - w)
            for t in range(T):
                clip[:, t, top:top + h, left:left + w] = torch.empty(C, h, w).normal_(generator=rngs.torch)
            break
    return clip
