"""ClipSpec: what one training (or evaluation) clip is — frame count, temporal stride, crop size and augmentation."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSpec:
    """One clip: `num_frames` frames `sampling_rate` apart, cropped and resized to `crop_size` x `crop_size`.

    train=True draws a random span end, a random-resized-crop box and a horizontal flip per clip (the official V-JEPA
    augmentation); train=False gives the deterministic eval clip (centred span, centre square, no flip).
    """
    num_frames: int = 16
    sampling_rate: int = 4  # frame step ("frame_step" in the official code)
    crop_size: int = 224
    random_resize_scale: tuple[float, float] = (0.3, 1.0)
    random_resize_aspect_ratio: tuple[float, float] = (0.75, 1.35)
    horizontal_flip: bool = True
    min_frames: int | None = None  # None -> num_frames; a video with fewer decodable frames is "too short"
    train: bool = True

    def __post_init__(self):
        for name in ("num_frames", "sampling_rate", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_frames is not None and self.min_frames < 1:
            raise ValueError(f"ClipSpec.min_frames must be None or >= 1, got {self.min_frames}")
        for name in ("random_resize_scale", "random_resize_aspect_ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"ClipSpec.{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
            object.__setattr__(self, name, (float(low), float(high)))  # YAML gives lists; keep the spec hashable

    @property
    def required_frames(self) -> int:
        """Fewest decodable frames a video must have to be used."""
        return self.num_frames if self.min_frames is None else self.min_frames
