"""Training-time augmentations against plain transcriptions of the official code: jepa/src/datasets/utils/video/
randaugment.py, randerase.py, transforms.py (random_resized_crop), evals/video_classification_frozen/utils.py
(VideoTransform(training=True)), and timm's create_transform(auto_augment='original', re_prob=0.25) used by
evals/image_classification_frozen/eval.py. Globals seeded as the official code draws from them (random, np.random,
torch); ours draws the same streams from explicit generators."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from data_fixtures import write_video
from vjepa_fast.dali_pipelines.pyav_decode import probe_video, read_frames
from vjepa_fast.eval.augment import Rngs
from vjepa_fast.eval.views import ViewSpec, train_image_clip, train_video_clips

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_MAX_LEVEL = 10.0


# -- randaugment.py (ops take the PIL kwargs fillcolor / resample) --
def _check_args_tf(kwargs):
    kwargs["resample"] = kwargs.pop("resample", Image.BILINEAR)


def shear_x(img, factor, **kwargs):
    _check_args_tf(kwargs)
    return img.transform(img.size, Image.AFFINE, (1, factor, 0, 0, 1, 0), **kwargs)


def shear_y(img, factor, **kwargs):
    _check_args_tf(kwargs)
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, factor, 1, 0), **kwargs)


def translate_x_rel(img, pct, **kwargs):
    pixels = pct * img.size[0]
    _check_args_tf(kwargs)
    return img.transform(img.size, Image.AFFINE, (1, 0, pixels, 0, 1, 0), **kwargs)


def translate_y_rel(img, pct, **kwargs):
    pixels = pct * img.size[1]
    _check_args_tf(kwargs)
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, pixels), **kwargs)


def rotate(img, degrees, **kwargs):
    _check_args_tf(kwargs)
    return img.rotate(degrees, **kwargs)


def solarize_add(img, add, thresh=128, **__):
    lut = []
    for i in range(256):
        lut.append(min(255, i + add) if i < thresh else i)
    if img.mode in ("L", "RGB"):
        if img.mode == "RGB" and len(lut) == 256:
            lut = lut + lut + lut
        return img.point(lut)
    return img


def posterize(img, bits_to_keep, **__):
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep)


def _randomly_negate(v):
    return -v if random.random() > 0.5 else v


def _enhance_level_to_arg(level, _hparams):
    return ((level / _MAX_LEVEL) * 1.8 + 0.1,)


def _enhance_increasing_level_to_arg(level, _hparams):
    level = (level / _MAX_LEVEL) * 0.9
    return (1.0 + _randomly_negate(level),)


def _posterize_level_to_arg(level, _hparams):
    return (int((level / _MAX_LEVEL) * 4),)


def _solarize_level_to_arg(level, _hparams):
    return (int((level / _MAX_LEVEL) * 256),)


LEVEL_TO_ARG = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": lambda level, _: (_randomly_negate((level / _MAX_LEVEL) * 30.0),),
    "PosterizeIncreasing": lambda level, h: (4 - _posterize_level_to_arg(level, h)[0],),
    "PosterizeOriginal": lambda level, _: (int((level / _MAX_LEVEL) * 4) + 4,),
    "Solarize": _solarize_level_to_arg,
    "SolarizeIncreasing": lambda level, h: (256 - _solarize_level_to_arg(level, h)[0],),
    "SolarizeAdd": lambda level, _: (int((level / _MAX_LEVEL) * 110),),
    "Color": _enhance_level_to_arg, "ColorIncreasing": _enhance_increasing_level_to_arg,
    "Contrast": _enhance_level_to_arg, "ContrastIncreasing": _enhance_increasing_level_to_arg,
    "Brightness": _enhance_level_to_arg, "BrightnessIncreasing": _enhance_increasing_level_to_arg,
    "Sharpness": _enhance_level_to_arg, "SharpnessIncreasing": _enhance_increasing_level_to_arg,
    "ShearX": lambda level, _: (_randomly_negate((level / _MAX_LEVEL) * 0.3),),
    "ShearY": lambda level, _: (_randomly_negate((level / _MAX_LEVEL) * 0.3),),
    "TranslateXRel": lambda level, h: (_randomly_negate((level / _MAX_LEVEL) * h.get("translate_pct", 0.45)),),
    "TranslateYRel": lambda level, h: (_randomly_negate((level / _MAX_LEVEL) * h.get("translate_pct", 0.45)),),
}

NAME_TO_OP = {
    "AutoContrast": lambda img, **__: ImageOps.autocontrast(img), "Equalize": lambda img, **__: ImageOps.equalize(img),
    "Invert": lambda img, **__: ImageOps.invert(img), "Rotate": rotate, "PosterizeIncreasing": posterize,
    "PosterizeOriginal": posterize, "Solarize": lambda img, thresh, **__: ImageOps.solarize(img, thresh),
    "SolarizeIncreasing": lambda img, thresh, **__: ImageOps.solarize(img, thresh), "SolarizeAdd": solarize_add,
    "Color": lambda img, f, **__: ImageEnhance.Color(img).enhance(f),
    "ColorIncreasing": lambda img, f, **__: ImageEnhance.Color(img).enhance(f),
    "Contrast": lambda img, f, **__: ImageEnhance.Contrast(img).enhance(f),
    "ContrastIncreasing": lambda img, f, **__: ImageEnhance.Contrast(img).enhance(f),
    "Brightness": lambda img, f, **__: ImageEnhance.Brightness(img).enhance(f),
    "BrightnessIncreasing": lambda img, f, **__: ImageEnhance.Brightness(img).enhance(f),
    "Sharpness": lambda img, f, **__: ImageEnhance.Sharpness(img).enhance(f),
    "SharpnessIncreasing": lambda img, f, **__: ImageEnhance.Sharpness(img).enhance(f),
    "ShearX": shear_x, "ShearY": shear_y, "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel,
}


class AugmentOp:
    def __init__(self, name, prob=0.5, magnitude=10, hparams=None):
        self.aug_fn, self.level_fn = NAME_TO_OP[name], LEVEL_TO_ARG[name]
        self.prob, self.magnitude, self.hparams = prob, magnitude, hparams.copy()
        self.kwargs = {"fillcolor": hparams["img_mean"] if "img_mean" in hparams else (128, 128, 128),
                       "resample": hparams["interpolation"]}
        self.magnitude_std = self.hparams.get("magnitude_std", 0)

    def __call__(self, img_list):
        if self.prob < 1.0 and random.random() > self.prob:
            return img_list
        magnitude = self.magnitude
        if self.magnitude_std and self.magnitude_std > 0:
            magnitude = random.gauss(magnitude, self.magnitude_std)
        magnitude = min(_MAX_LEVEL, max(0, magnitude))
        level_args = self.level_fn(magnitude, self.hparams) if self.level_fn is not None else ()
        if isinstance(img_list, list):
            return [self.aug_fn(img, *level_args, **dict(self.kwargs)) for img in img_list]
        return self.aug_fn(img_list, *level_args, **dict(self.kwargs))


_RAND_INCREASING_TRANSFORMS = [
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel"]


class RandAugment:
    def __init__(self, ops, num_layers=2, choice_weights=None):
        self.ops, self.num_layers, self.choice_weights = ops, num_layers, choice_weights

    def __call__(self, img):
        ops = np.random.choice(self.ops, self.num_layers, replace=self.choice_weights is None, p=self.choice_weights)
        for op in ops:
            img = op(img)
        return img


def _video_rand_augment(crop_size):
    """create_random_augment(input_size=(crop, crop), auto_augment='rand-m7-n4-mstd0.5-inc1', 'bicubic')."""
    hparams = {"translate_const": int(crop_size * 0.45), "interpolation": Image.BICUBIC, "magnitude_std": 0.5}
    return RandAugment([AugmentOp(n, prob=0.5, magnitude=7, hparams=hparams) for n in _RAND_INCREASING_TRANSFORMS], 4)


def _get_param_spatial_crop(scale, ratio, height, width, num_repeat=10, log_scale=True, switch_hw=False):
    for _ in range(num_repeat):
        area = height * width
        target_area = random.uniform(*scale) * area
        if log_scale:
            log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
            aspect_ratio = math.exp(random.uniform(*log_ratio))
        else:
            aspect_ratio = random.uniform(*ratio)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if np.random.uniform() < 0.5 and switch_hw:
            w, h = h, w
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
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _random_resized_crop(images, target_height, target_width, scale, ratio):
    i, j, h, w = _get_param_spatial_crop(scale, ratio, images.shape[2], images.shape[3])
    cropped = images[:, :, i:i + h, j:j + w]
    return torch.nn.functional.interpolate(cropped, size=(target_height, target_width), mode="bilinear",
                                           align_corners=False)


class RandomErasing:
    """randerase.py / timm RandomErasing with mode='pixel', max_count=1; cube=True for the video's [T, C, H, W]."""

    def __init__(self, probability, attempts):
        self.probability, self.attempts = probability, attempts
        self.min_area, self.max_area, self.log_aspect_ratio = 0.02, 1 / 3, (math.log(0.3), math.log(1 / 0.3))

    def __call__(self, img_instances, chan, img_h, img_w):
        if random.random() > self.probability:
            return
        area = img_h * img_w
        for _ in range(self.attempts):
            target_area = random.uniform(self.min_area, self.max_area) * area / 1
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < img_w and h < img_h:
                top = random.randint(0, img_h - h)
                left = random.randint(0, img_w - w)
                for img in img_instances:
                    img[:, top:top + h, left:left + w] = torch.empty((chan, h, w), dtype=torch.float32).normal_()
                break


def _to_tensor_normalize(pil_list):
    """ToTensor per frame, stack [T, C, H, W] -> [T, H, W, C], tensor_normalize, -> [C, T, H, W]."""
    buffer = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255) for img in pil_list])
    buffer = buffer.permute(0, 2, 3, 1)
    buffer = (buffer - torch.tensor(MEAN)) / torch.tensor(STD)
    return buffer.permute(3, 0, 1, 2)


def _official_video_train_transform(frames, crop_size):
    """VideoTransform(training=True, random_horizontal_flip=False, scale (0.08, 1), ratio (0.75, 4/3), reprob 0.25,
    auto_augment=True, motion_shift=False)."""
    buffer = [Image.fromarray(frame) for frame in frames]
    buffer = _video_rand_augment(crop_size)(buffer)
    buffer = _to_tensor_normalize(buffer)
    buffer = _random_resized_crop(buffer, crop_size, crop_size, scale=(0.08, 1.0), ratio=(0.75, 4 / 3))
    buffer = buffer.permute(1, 0, 2, 3)
    RandomErasing(0.25, attempts=100)(list(buffer), *buffer.shape[1:])
    return buffer.permute(1, 0, 2, 3)


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@pytest.mark.parametrize("seed", range(6))
def test_video_training_clips_are_the_official_augmentation(tmp_path, seed):
    from test_eval_views import _official_clip_indices

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(60, 24, 32, 3), dtype=np.uint8)
    pixels[:, 6:18, 8:24] //= 3  # some structure for the ops to act on
    path = write_video(tmp_path / "v.webm", pixels)
    spec = ViewSpec(num_frames=4, sampling_rate=2, crop_size=16, num_segments=2)
    ours = train_video_clips(path, spec, Rngs.seeded(seed))

    _seed_all(seed)
    info = probe_video(path)
    buffer = read_frames(path, np.concatenate(_official_clip_indices(info.num_frames, 4, 2, 2)), info)
    official = torch.stack([_official_video_train_transform(buffer[i * 4:(i + 1) * 4], 16) for i in range(2)])
    assert ours.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=1e-4)


# -- timm: transforms_imagenet_train + AutoAugment('original') + RandomErasing --
_AA_ORIGINAL = [
    [("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)], [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)], [("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)], [("Equalize", 0.4, 4), ("Rotate", 0.8, 8)],
    [("Solarize", 0.6, 3), ("Equalize", 0.6, 7)], [("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)],
    [("Rotate", 0.2, 3), ("Solarize", 0.6, 8)], [("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)],
    [("Rotate", 0.8, 8), ("Color", 0.4, 0)], [("Rotate", 0.4, 9), ("Equalize", 0.6, 2)],
    [("Equalize", 0.0, 7), ("Equalize", 0.8, 8)], [("Invert", 0.6, 4), ("Equalize", 1.0, 8)],
    [("Color", 0.6, 4), ("Contrast", 1.0, 8)], [("Rotate", 0.8, 8), ("Color", 1.0, 2)],
    [("Color", 0.8, 8), ("Solarize", 0.8, 7)], [("Sharpness", 0.4, 7), ("Invert", 0.6, 8)],
    [("ShearX", 0.6, 5), ("Equalize", 1.0, 9)], [("Color", 0.4, 0), ("Equalize", 0.6, 3)],
    [("Equalize", 0.4, 7), ("Solarize", 0.2, 4)], [("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)],
    [("Invert", 0.6, 4), ("Equalize", 1.0, 8)], [("Color", 0.6, 4), ("Contrast", 1.0, 8)],
    [("Equalize", 0.8, 8), ("Equalize", 0.6, 3)]]


def _timm_rrc_get_params(img, scale, ratio):
    area = img.size[0] * img.size[1]
    for attempt in range(10):
        target_area = random.uniform(*scale) * area
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= img.size[0] and h <= img.size[1]:
            i = random.randint(0, img.size[1] - h)
            j = random.randint(0, img.size[0] - w)
            return i, j, h, w
    in_ratio = img.size[0] / img.size[1]
    if in_ratio < min(ratio):
        w = img.size[0]
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = img.size[1]
        w = int(round(h * max(ratio)))
    else:
        w, h = img.size
    return (img.size[1] - h) // 2, (img.size[0] - w) // 2, h, w


def _official_image_train_transform(img, size):
    i, j, h, w = _timm_rrc_get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
    img = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)  # F.resized_crop on PIL
    if torch.rand(1) < 0.5:  # RandomHorizontalFlip
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in MEAN),
               "interpolation": Image.BICUBIC}
    policy = [[AugmentOp(*a, hparams=hparams) for a in sp] for sp in _AA_ORIGINAL]
    for op in random.choice(policy):  # AutoAugment
        img = op(img)
    x = _to_tensor_normalize([img])[:, 0]  # [C, H, W]
    RandomErasing(0.25, attempts=10)([x], *x.shape)
    return x


@pytest.mark.parametrize("seed", range(8))
def test_image_training_clip_is_timms_augmentation(tmp_path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30, 44, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    ours = train_image_clip(str(tmp_path / "img.png"), ViewSpec(num_frames=3, sampling_rate=1, crop_size=16),
                            Rngs.seeded(seed))
    _seed_all(seed)
    official = _official_image_train_transform(Image.open(tmp_path / "img.png").convert("RGB"), 16)
    assert ours.shape == (1, 3, 3, 16, 16)
    for t in range(3):  # the image repeated into a still clip (the official encoder's pre-hook)
        torch.testing.assert_close(ours[0, :, t], official, atol=1e-4, rtol=1e-4)
