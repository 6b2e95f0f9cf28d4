"""ClipSpec: what one training (or evaluation) clip is — frame count, temporal stride, crop size and augmentation."""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSpec:
    """One clip: `num_frames` frames `sampling_rate` apart, cropped and resized to `crop_size` x `crop_size`.

    V-JEPA 2's options: `fps` samples the frames at that rate in time instead (a video's frame step is
    ceil(its fps) // fps, as the official loader computes it), and `source_frames` gives each dataset file its own
    clip length (data.dataset_fpcs; a batch then holds clips of several lengths).
    train=True draws a random span end, a random-resized-crop box and a horizontal flip per clip (the official V-JEPA
    augmentation); train=False gives the deterministic eval clip (centred span, centre square, no flip).
    """
    num_frames: int = 16
    sampling_rate: int = 4  # frame step ("frame_step" in the official code)
    crop_size: int = 224
    random_resize_scale: tuple[float, float] = (0.3, 1.0)
    random_resize_aspect_ratio: tuple[float, float] = (0.75, 1.35)
    horizontal_flip: bool = True
    min_frames: int | None = None  # None -> the clip's frames; a video with fewer decodable frames is "too short"
    train: bool = True
    fps: float | None = None
    source_frames: tuple[int, ...] | None = None  # frames per clip of each dataset file (None: num_frames for all)

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

        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"ClipSpec.fps must be None or > 0, got {self.fps}")
        if self.source_frames is not None:
            object.__setattr__(self, "source_frames", tuple(int(f) for f in self.source_frames))
            if not self.source_frames or min(self.source_frames) < 1:
                raise ValueError(f"ClipSpec.source_frames must be clip lengths >= 1, got {self.source_frames}")

    def frames_for(self, source: int) -> int:
        """The clip length of the videos of dataset file `source`."""
        return self.num_frames if self.source_frames is None else self.source_frames[source]

    @property
    def clip_lengths(self) -> tuple[int, ...]:
        """The distinct clip lengths, in the order a batch groups them (first appearance in source_frames)."""
        return (self.num_frames,) if self.source_frames is None else tuple(dict.fromkeys(self.source_frames))

    def frame_step(self, video_fps: float) -> int:
        """Frames between two sampled frames of a video: sampling_rate, or with `fps` ceil(video_fps) // fps (0 for a
        video slower than fps, which cannot give such a clip)."""
        return self.sampling_rate if self.fps is None else int(math.ceil(video_fps) // self.fps)

    def required_frames(self, frames: int | None = None) -> int:
        """Fewest decodable frames a video must have to be used for a clip of `frames` (default num_frames)."""
        return (frames or self.num_frames) if self.min_frames is None else self.min_frames
