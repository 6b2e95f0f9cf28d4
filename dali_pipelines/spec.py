"""ClipSpec: what one training (or evaluation) clip is — frame count, temporal stride, crop size and augmentation."""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ClipSpec:
    """One clip: `num_frames` frames `sampling_rate` apart, cropped and resized to `crop_size` x `crop_size`.

    `fps` (V-JEPA 2) samples the frames at that rate in time instead (a video's frame step is ceil(its fps) // fps),
    and `duration` (V-JEPA 1's clip_duration) spreads the clip over that many seconds (step int(duration * fps /
    frames)), as the official loaders compute them; `source_frames` gives each dataset file its own clip length
    (data.dataset_fpcs; a batch then holds clips of several lengths).
    Which videos are skipped, as the official loader: files over `filter_long_videos` bytes, and with
    `filter_short_videos` videos with fewer frames than the clip spans; `min_frames` (this project's) skips videos
    with fewer frames than that. Other short videos are sampled whole with their last frame repeated.
    train=True draws a random span end, a random-resized-crop box and a horizontal flip per clip (the official V-JEPA
    augmentation); train=False gives the deterministic eval clip (centred span, centre square, no flip).
    """
    num_frames: int = 16
    sampling_rate: int = 4  # frame step ("frame_step" in the official code)
    crop_size: int = 224
    random_resize_scale: tuple[float, float] = (0.3, 1.0)
    random_resize_aspect_ratio: tuple[float, float] = (0.75, 1.35)
    horizontal_flip: bool = True
    min_frames: int | None = None  # a video with fewer frames is "too_short" (None: no minimum)
    filter_short_videos: bool = False  # a video with fewer frames than the clip spans is "too_short"
    filter_long_videos: int = 10**9  # a file of more bytes is "too_large"
    train: bool = True
    fps: float | None = None
    duration: float | None = None  # seconds a clip spans (instead of sampling_rate; not with fps)
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

        for name in ("fps", "duration"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"ClipSpec.{name} must be None or > 0, got {getattr(self, name)}")
        if self.fps is not None and self.duration is not None:
            raise ValueError(f"ClipSpec takes fps={self.fps} or duration={self.duration}, not both")
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

    def frame_step(self, video_fps: float, frames: int | None = None) -> int:
        """Frames between two sampled frames of a clip of `frames` (default num_frames) frames from a `video_fps`
        video: sampling_rate,
        or with `fps` ceil(video_fps) // fps, or with `duration` int(duration * video_fps / frames) (0 when the
        video's frame rate cannot give such a clip)."""
        if self.fps is not None:
            return int(math.ceil(video_fps) // self.fps)
        if self.duration is not None:
            return int(self.duration * video_fps / (frames or self.num_frames))
        return self.sampling_rate
