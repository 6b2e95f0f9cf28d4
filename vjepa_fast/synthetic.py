"""Embedded synthetic video dataset: moving shapes with a motion label and an appearance label, generated once.

Generative model of video i (everything below drawn from a generator seeded by (seed, i), so the dataset is a pure
function of its parameters):
- labels cycle so that every 64 consecutive videos cover all (direction, appearance) pairs once: direction =
  i % 8, appearance = (i // 8) % 8; every fifth video (i % 5 == 4) is in the val split. Each label is therefore
  independent of the other, and both are exactly balanced in every split when num_videos is a multiple of 320.
- background: static, low-saturation grey texture (random grey level, three random smooth sinusoidal gratings,
  a faint colour tint and pixel noise). It carries no label information.
- one or two shapes of one kind (circle, square, triangle, cross) and one colour group (warm hues 0-50 degrees or
  cool hues 180-250 degrees, saturated); appearance label = kind * 2 + colour group. Each shape has its own size
  (radius 7-11 px), exact hue, and start position.
- motion: all shapes translate at one constant speed of 1.0-1.5 px/frame in direction d * 45 degrees (0 = right,
  counter-clockwise on screen: 2 = up), wrapping around the frame edges so the direction stays well-defined and
  the shapes stay in view. Over a clip of 8 frames at stride 4 they move 28-42 px.
Sizes and speeds are for the default 80 px frames and scale with the frame size.
Shapes are rendered anti-aliased from signed distance functions, so sub-pixel motion is smooth. Videos are VP9
.webm at 16 fps (DALI's CPU decoder reads VP9). A horizontal flip mirrors the direction label (d -> 4 - d mod 8):
train motion probes without flips.

The dataset lives in the user cache dir, in a folder named by a version and a hash of the parameters; it is built
in a temporary sibling folder and renamed into place, so an interrupted build is never used.
"""
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .dali_pipelines.pyav_decode import pyav
from .processes import process_gone

VERSION = 1  # bump when the generative model changes: the cache folder name changes with it
FPS = 16
SHAPES = ("circle", "square", "triangle", "cross")
HUE_RANGES = ((0.0, 50.0), (180.0, 250.0))  # colour groups in degrees: warm, cool
NUM_DIRECTIONS = 8
NUM_APPEARANCE_CLASSES = len(SHAPES) * len(HUE_RANGES)
SPEED_RANGE = (1.0, 1.5)  # px per frame
RADIUS_RANGE = (7.0, 11.0)  # px, at an 80 px frame; scaled with the frame size
VP9_OPTIONS = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0"}
KEYFRAME_INTERVAL = 16


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lives: its folder and its dataset files (official `path label` format)."""
    root: str
    motion_csv: str
    motion_train_csv: str
    motion_val_csv: str
    appearance_csv: str
    appearance_train_csv: str
    appearance_val_csv: str
    num_motion_classes: int = NUM_DIRECTIONS
    num_appearance_classes: int = NUM_APPEARANCE_CLASSES

    @classmethod
    def at(cls, root: str) -> "SyntheticDataset":
        files = {f"{task}{split}_csv": os.path.join(root, f"{task}{split}.csv")
                 for task in ("motion", "appearance") for split in ("", "_train", "_val")}
        return cls(root=root, **files)


def default_cache_dir() -> str:
    """$VJEPA_FAST_CACHE, else $XDG_CACHE_HOME/vjepa_fast, else ~/.cache/vjepa_fast."""
    if os.environ.get("VJEPA_FAST_CACHE"):
        return os.environ["VJEPA_FAST_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "vjepa_fast")


def video_labels(index: int) -> tuple[int, int]:
    """(direction, appearance) labels of video `index`."""
    return index % NUM_DIRECTIONS, (index // NUM_DIRECTIONS) % NUM_APPEARANCE_CLASSES


def is_val(index: int) -> bool:
    return index % 5 == 4


def shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (px, negative inside) of points (dx, dy) from a shape centred at 0 (y points down)."""
    if shape == "circle":
        return np.hypot(dx, dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * radius
    if shape == "triangle":  # equilateral, apex up: the largest of the three edges' half-plane distances
        edges = [dy, 0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy]
        return np.maximum.reduce(edges) - 0.625 * radius
    if shape == "cross":
        arm = 0.35 * radius
        return np.minimum(np.maximum(np.abs(dx) - radius, np.abs(dy) - arm),
                          np.maximum(np.abs(dx) - arm, np.abs(dy) - radius))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def hue_to_rgb(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    """RGB in [0, 255] of an HSV colour."""
    channel_offsets = np.array([5.0, 3.0, 1.0])  # the standard HSV -> RGB formula, channel by channel
    k = (channel_offsets + hue_degrees / 60.0) % 6
    return 255 * value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def render_video(seed: int, index: int, frames: int, size: int) -> np.ndarray:
    """uint8 RGB frames [frames, size, size, 3] of video `index` (see the module docstring)."""
    direction, appearance = video_labels(index)
    shape, colour_group = SHAPES[appearance // len(HUE_RANGES)], appearance % len(HUE_RANGES)
    rng = np.random.default_rng((seed, index))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres

    background = np.full((size, size, 3), rng.uniform(70, 170), dtype=np.float32)
    for _ in range(3):  # smooth gratings of 0-3 periods per frame (periodic, like the wrap-around motion)
        fx, fy = rng.integers(-3, 4, size=2)
        grating = np.sin(2 * np.pi * (fx * x + fy * y) / size + rng.uniform(0, 2 * np.pi))
        background += rng.uniform(6, 14) * grating[..., None]
    background += rng.uniform(-8, 8, size=3).astype(np.float32)
    background += rng.normal(0, 5, size=(size, size, 1)).astype(np.float32)
    video = np.repeat(background[None], frames, axis=0)

    angle = direction * math.pi / 4
    speed = rng.uniform(*SPEED_RANGE) * size / 80
    velocity = np.array([math.cos(angle), -math.sin(angle)]) * speed
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    for _ in range(rng.integers(1, 3)):
        radius = rng.uniform(*RADIUS_RANGE) * size / 80
        colour = hue_to_rgb(rng.uniform(*HUE_RANGES[colour_group]), rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
        start = rng.uniform(0, size, size=2)
        dx = (x - start[0] - velocity[0] * t + size / 2) % size - size / 2  # wrap-around offsets
        dy = (y - start[1] - velocity[1] * t + size / 2) % size - size / 2
        coverage = np.clip(0.5 - shape_distance(shape, dx, dy, radius), 0, 1)[..., None]
        video = video * (1 - coverage) + colour.astype(np.float32) * coverage
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def write_webm(path: str, video: np.ndarray, fps: int = FPS) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] as VP9 in a .webm file."""
    av = pyav()
    with av.open(path, "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps, options=VP9_OPTIONS)
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = KEYFRAME_INTERVAL
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_video(job: tuple[str, int, int, int, int]) -> None:
    folder, seed, index, frames, size = job
    write_webm(os.path.join(folder, "videos", f"{index:05d}.webm"), render_video(seed, index, frames, size))


def _write_dataset_files(folder: str, num_videos: int) -> None:
    """The six `path label` files: motion/appearance x all/train/val."""
    for task_number, task in enumerate(("motion", "appearance")):
        for split in ("", "_train", "_val"):
            with open(os.path.join(folder, f"{task}{split}.csv"), "w") as f:
                for index in range(num_videos):
                    if (split == "_train" and is_val(index)) or (split == "_val" and not is_val(index)):
                        continue
                    f.write(f"videos/{index:05d}.webm {video_labels(index)[task_number]}\n")


def _remove_abandoned_builds(cache: str, name: str) -> None:
    """Delete this host's temporary build folders of `name` whose building process is gone (killed mid-build)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-{re.escape(socket.gethostname())}-(\d+)-.*")
    for entry in os.listdir(cache):
        match = pattern.fullmatch(entry)
        if match and process_gone(int(match.group(1))):
            shutil.rmtree(os.path.join(cache, entry), ignore_errors=True)


def ensure_synthetic_dataset(root: str | None = None, *, num_videos: int = 640, frames: int = 48, size: int = 80,
                             seed: int = 0, progress: bool = True, processes: int = 2) -> SyntheticDataset:
    """The synthetic dataset with these parameters under `root` (default: the user cache dir), built if missing."""
    if num_videos < 1 or frames < 1 or size < 8:
        raise ValueError(f"need num_videos >= 1, frames >= 1, size >= 8; got {num_videos}, {frames}, {size}")
    params = {"version": VERSION, "num_videos": num_videos, "frames": frames, "size": size, "fps": FPS, "seed": seed}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    name = f"synthetic-v{VERSION}-{digest}"
    cache = root or default_cache_dir()
    folder = os.path.join(cache, name)
    if os.path.isdir(folder):
        return SyntheticDataset.at(folder)

    os.makedirs(cache, exist_ok=True)
    _remove_abandoned_builds(cache, name)
    build = tempfile.mkdtemp(prefix=f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=cache)
    try:
        os.makedirs(os.path.join(build, "videos"))
        jobs = [(build, seed, index, frames, size) for index in range(num_videos)]
        with multiprocessing.Pool(processes) as pool:
            for _ in tqdm(pool.imap_unordered(_write_video, jobs, chunksize=8), total=num_videos,
                          desc="synthetic videos", disable=not progress):
                pass
        _write_dataset_files(build, num_videos)
        with open(os.path.join(build, "params.json"), "w") as f:
            json.dump(params, f, indent=1)
        try:
            os.rename(build, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
            # another process finished the same dataset first; ours is redundant (removed below)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return SyntheticDataset.at(folder)
