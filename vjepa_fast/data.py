"""The trainer's view of the data: a config -> a stream of (clips, labels) batches from dali_pipelines."""
from __future__ import annotations

import logging
import math

from .config import Config
from .dali_pipelines import ClipSpec, make_loader, read_dataset_files

log = logging.getLogger(__name__)


def clip_spec(cfg: Config, train: bool = True) -> ClipSpec:
    d, a = cfg.data, cfg.data_aug
    return ClipSpec(num_frames=d.num_frames, sampling_rate=d.sampling_rate or 1, crop_size=d.crop_size,
                    random_resize_scale=tuple(a.random_resize_scale),
                    random_resize_aspect_ratio=tuple(a.random_resize_aspect_ratio),
                    horizontal_flip=a.horizontal_flip, min_frames=d.min_frames,
                    filter_short_videos=d.filter_short_videos, filter_long_videos=d.filter_long_videos, train=train,
                    fps=d.fps, duration=d.clip_duration,
                    source_frames=None if d.dataset_fpcs is None else tuple(d.dataset_fpcs))


def dataset_paths(cfg: Config) -> list[str]:
    """The configured dataset files, or the embedded synthetic dataset's motion file when none is set."""
    if cfg.data.datasets:
        return list(cfg.data.datasets)
    from .synthetic import ensure_synthetic_dataset

    synthetic = ensure_synthetic_dataset()
    log.info("no data.datasets configured: training on the embedded synthetic dataset at %s", synthetic.root)
    return [str(synthetic.motion_train_csv)]


def build_train_loader(cfg: Config, paths: list[str], *, start_step: int = 0, rank: int = 0, world_size: int = 1):
    """The training stream over the dataset files `paths` (see dataset_paths)."""
    return make_loader(paths, clip_spec(cfg), batch_size=cfg.data.batch_size, seed=cfg.meta.seed,
                       weights=cfg.data.datasets_weights, start_step=start_step, rank=rank,
                       world_size=world_size, num_workers=cfg.data.num_workers, loader=cfg.data.loader)


def steps_per_pass(cfg: Config, paths: list[str], world_size: int = 1) -> int:
    """Steps of one pass over the dataset files `paths`: what optimization.ipe null means. As the official trainers'
    len(loader): each rank's share of the samples (the sampler pads to a multiple of world_size) in whole batches of
    data.batch_size (x optimization.accumulation_steps, the clips of one step here); at least 1."""
    per_rank = math.ceil(len(read_dataset_files(paths)) / world_size)
    return max(1, per_rank // (cfg.data.batch_size * cfg.optimization.accumulation_steps))
