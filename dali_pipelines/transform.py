"""Turn decoded uint8 frames into the model's input clip: crop box, bilinear resize, optional flip, normalise."""
import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics on the 0-255 scale, as the official VideoTransform uses them without auto-augment.
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).mul(255).view(3, 1, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).mul(255).view(3, 1, 1, 1)


def clip_tensor(frames: np.ndarray, box: tuple[int, int, int, int], crop_size: int, flip: bool) -> torch.Tensor:
    """float32 [3, T, crop_size, crop_size] from uint8 frames [T, H, W, 3] and a (top, left, height, width) box.

    The official code converts the whole frames to float, crops, then resizes (bilinear, align_corners=False);
    cropping the uint8 frames first is exact and converts only the box. Normalising in place saves two copies.
    """
    top, left, height, width = box
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + height, left:left + width]))
    clip = crop.permute(3, 0, 1, 2).float()  # [3, T, h, w]: interpolate treats T as channels, so one box for all
    clip = F.interpolate(clip, size=(crop_size, crop_size), mode="bilinear", align_corners=False)
    if flip:
        clip = clip.flip(-1)
    return clip.sub_(IMAGENET_MEAN).div_(IMAGENET_STD)
