"""The CPU clip loader: an infinite, step-indexed stream of (clips, labels) batches decoded with PyAV.

Batch k of a rank holds stream positions k*B .. k*B+B-1 (sample_order.py), and every random choice of a clip comes
from a generator seeded by (seed, global sample position, attempt), never from worker state. So batch k is a pure
function of (seed, k, rank, world_size, dataset) whatever the number of workers, and make_loader(start_step=k)
resumes exactly. A bad video is replaced by a fresh deterministic draw (attempt + 1) and reported to the main
process with the batch, where bad_input.SkipTracker counts and logs it.
"""
from collections.abc import Sequence

import numpy as np
import torch

from dali_pipelines.bad_input import SkipTracker, VideoError, describe_failures
from dali_pipelines.dataset_file import DatasetIndex, read_dataset_files
from dali_pipelines.pyav_decode import probe_video, read_frames
from dali_pipelines.sample_order import CLIP_STREAM, SampleOrder
from dali_pipelines.sampling import centre_square_box, frame_indices, random_resized_crop_box
from dali_pipelines.spec import ClipSpec
from dali_pipelines.transform import clip_tensor

# Draws tried for one batch slot before its worker gives up (all bad: the dataset is mostly unusable).
MAX_DRAWS_PER_CLIP = 32


class ClipDataset(torch.utils.data.Dataset):
    """Loads the clip for a (global sample position, dataset index) key, replacing bad videos by fresh draws.

    Returns (clip [3, T, S, S], label, attempts) where attempts lists (dataset index, skip reason or None, detail)
    for every video tried, for the main process's SkipTracker.
    """

    def __init__(self, dataset: DatasetIndex, spec: ClipSpec, seed: int):
        self.dataset = dataset
        self.spec = spec
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        attempts = []
        for attempt in range(MAX_DRAWS_PER_CLIP):
            rng = np.random.default_rng((self.seed, CLIP_STREAM, position, attempt))
            if attempt > 0:
                index = int(rng.choice(len(self.dataset), p=self.dataset.probabilities))
            try:
                clip = self.load_clip(self.dataset.paths[index], rng)
            except VideoError as error:
                attempts.append((index, error.reason, error.detail))
                continue
            attempts.append((index, None, None))
            return clip, int(self.dataset.labels[index]), attempts
        failures = list(dict.fromkeys((self.dataset.paths[i], reason, detail) for i, reason, detail in attempts))
        raise RuntimeError(f"{MAX_DRAWS_PER_CLIP} videos drawn in a row are unusable; check the dataset files:\n"
                           f"{describe_failures(failures)}")

    def load_clip(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        """Decode and augment one clip of `path` with the random choices of `rng` (none in eval mode)."""
        spec = self.spec
        info = probe_video(path)
        if info.num_frames < spec.required_frames:
            raise VideoError("too_short", f"{info.num_frames} frames, at least {spec.required_frames} needed")
        indices = frame_indices(info.num_frames, spec.num_frames, spec.sampling_rate, rng if spec.train else None)
        frames = read_frames(path, indices, info)
        height, width = frames.shape[1:3]
        if spec.train:
            box = random_resized_crop_box(height, width, spec.random_resize_scale,
                                          spec.random_resize_aspect_ratio, rng)
            flip = spec.horizontal_flip and rng.uniform() < 0.5
        else:
            box, flip = centre_square_box(height, width), False
        return clip_tensor(frames, box, spec.crop_size, flip)


class StepBatches:
    """Batch sampler: the keys of batches start_step, start_step+1, ... of one rank, forever."""

    def __init__(self, order: SampleOrder, batch_size: int, start_step: int):
        self.order = order
        self.batch_size = batch_size
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        while True:
            first = step * self.batch_size
            yield [self.order.draw(position) for position in range(first, first + self.batch_size)]
            step += 1


def collate_clips(items):
    """Stack a batch's clips and labels; concatenate their load attempts."""
    clips, labels, attempts = zip(*items)
    return torch.stack(clips), torch.tensor(labels, dtype=torch.int64), [a for item in attempts for a in item]


class ClipLoader:
    """Iterator of (clips float32 [B, 3, T, S, S], labels int64 [B]); `step` is the index of the next batch, and
    `samples_per_epoch` the number of clips of one pass over the dataset on this rank.

    `stats` counts skipped videos by reason, `bad_files` maps each skipped path (logged once) to its reason. One
    DataLoader iterator lives as long as the ClipLoader, so its workers persist and prefetch.
    """

    def __init__(self, dataset: DatasetIndex, spec: ClipSpec, *, batch_size: int, seed: int, start_step: int,
                 rank: int, world_size: int, num_workers: int):
        order = SampleOrder(len(dataset), seed, rank, world_size, dataset.probabilities)
        data_loader = torch.utils.data.DataLoader(
            ClipDataset(dataset, spec, seed),
            batch_sampler=StepBatches(order, batch_size, start_step),
            collate_fn=collate_clips,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        self.step = start_step
        self.samples_per_epoch = order.per_rank  # this rank's clips per pass over the dataset ("ipe" x batch size)
        self.skips = SkipTracker(dataset.paths)
        self._batches = iter(data_loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            clips, labels, attempts = next(self._batches)
            self.skips.record(attempts)
        except BaseException:
            self.close()  # the exception's traceback keeps the DataLoader alive: stop its workers now
            raise
        self.step += 1
        return clips, labels

    def close(self) -> None:
        """Stop the worker processes now rather than when the loader is garbage-collected."""
        shutdown_workers = getattr(self._batches, "_shutdown_workers", None)  # absent with num_workers=0
        if shutdown_workers is not None:
            shutdown_workers()

    @property
    def stats(self) -> dict[str, int]:
        """Skipped videos so far by reason (every SKIP_REASONS key; a file skipped twice counts twice)."""
        return dict(self.skips.counts)

    @property
    def bad_files(self) -> dict[str, str]:
        """path -> skip reason of every distinct file skipped (and logged) so far."""
        return dict(self.skips.bad_files)


def loader_class(name: str) -> type:
    """The loader implementation `name` selects; "auto" is the best available (for now the PyAV CPU loader)."""
    if name in ("auto", "pyav"):
        return ClipLoader
    raise ValueError(f"unknown loader {name!r}: expected 'auto' or 'pyav'")


def make_loader(paths: Sequence[str], spec: ClipSpec, *, batch_size: int, seed: int,
                weights: Sequence[float] | None = None, start_step: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 1, loader: str = "auto") -> ClipLoader:
    """A loader over the dataset files `paths` (official `path label` format) that starts at batch `start_step`."""
    implementation = loader_class(loader)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = read_dataset_files(paths, weights)
    return implementation(dataset, spec, batch_size=batch_size, seed=seed, start_step=start_step, rank=rank,
                          world_size=world_size, num_workers=num_workers)
