"""Frozen evaluation of a checkpoint: encoder -> probes trained on augmented train clips (or, ours, on cached
features of the train views) and evaluated on the cached val views -> table."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from .. import checkpoint as ckpt
from ..dali_pipelines import read_dataset_files
from ..models import VisionTransformer
from ..models.vit import init_weights
from .features import FeatureSet, cached_features, encoder_for_frames
from .online import EncodedBatches
from .protocols import ProbeResult, ProbeSettings, fit_probe
from .views import ViewSpec, read_image_folder

OFFICIAL_SAMPLING_RATE = 4  # the eval frame step when a checkpoint records none (official ones; fps-sampled runs)


@dataclass
class FrozenEncoder:
    """A checkpoint's frozen encoder and what the eval clips need from its training setup."""
    encoder: VisionTransformer
    sampling_rate: int
    step: int | None  # training steps of our checkpoints; None for official ones
    name: str  # the run directory's name for <run>/checkpoints/*.pt, else the file's stem
    path: str


def load_frozen(path: str, key: str = "target_encoder", *, num_frames: int | None = None,
                num_heads: int | None = None, use_rope: bool | None = None,
                img_size: int | None = None) -> FrozenEncoder:
    """The frozen `key` encoder of one of our checkpoints or an official one (see checkpoint.load_encoder)."""
    state = ckpt.load_checkpoint(path)
    ours = ckpt.TrainingState.from_dict(state, path) if ckpt.is_ours(state) else None
    cfg = ours.cfg if ours else None  # built once: each build validates and warns
    encoder = ckpt.encoder_from_checkpoint(state, path, key, num_frames=num_frames, num_heads=num_heads,
                                           use_rope=use_rope, img_size=img_size, cfg=cfg)
    p = Path(path).resolve()
    name = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
    return FrozenEncoder(encoder, (cfg.data.sampling_rate if cfg else None) or OFFICIAL_SAMPLING_RATE,
                         ours.step if ours else None, name, str(path))


def random_init_like(encoder: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """The same architecture freshly initialised (the official init), frozen: the baseline a probe must beat."""
    fresh = copy.deepcopy(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_weights(fresh, fresh.blocks)
    return fresh.eval().requires_grad_(False)


@dataclass
class Split:
    """The labelled items of one split: video paths (dataset file) or image paths (image folder)."""
    paths: list[str]
    labels: list[int]
    kind: str  # "video" or "image"


def dataset_file_split(path: str) -> Split:
    index = read_dataset_files([path])
    return Split(list(index.paths), index.labels.tolist(), "video")


def image_folder_splits(root: str) -> tuple[Split, Split, int]:
    """(train, val, number of classes) of an ImageFolder tree root/{train,val}/<class>/*."""
    train_paths, train_labels, classes = read_image_folder(root, "train")
    val_paths, val_labels, _ = read_image_folder(root, "val", classes)
    return Split(train_paths, train_labels, "image"), Split(val_paths, val_labels, "image"), len(classes)


def features_of(encoder: VisionTransformer, split: Split, spec: ViewSpec, *, cache_dir: str | None, device,
                batch_size: int, num_workers: int, progress: bool) -> FeatureSet:
    return cached_features(encoder, split.paths, split.labels, spec, kind=split.kind, cache_dir=cache_dir,
                           device=device, batch_size=batch_size, num_workers=num_workers, progress=progress)


def probe_encoder(encoder: VisionTransformer, train: Split, val: Split, spec: ViewSpec, *, num_classes: int,
                  probes: Sequence[str], settings: ProbeSettings, out_dir: str, cache_dir: str | None = None,
                  device="cpu", num_workers: int = 1, progress: bool = True, tag: str = "",
                  cached_train: bool = False) -> list[ProbeResult]:
    """Train each probe as the official protocol does (the encoder run every epoch on freshly augmented train
    clips, one spatial view each), or with `cached_train` on cached features of the un-augmented train views
    (ours: faster, not the official protocol); val views are cached. Rows go to out_dir/<tag><probe>.csv."""
    os.makedirs(out_dir, exist_ok=True)
    kw = dict(cache_dir=cache_dir, device=device, batch_size=settings.micro_batch, num_workers=num_workers,
              progress=progress)
    val_features = features_of(encoder, val, spec, **kw)
    if cached_train:
        train_source = features_of(encoder, train, spec, **kw)
    else:
        train_source = EncodedBatches(encoder_for_frames(encoder, spec.num_frames), train.paths, train.labels,
                                      replace(spec, num_views=1), kind=train.kind, batch_size=settings.batch_size,
                                      micro_batch=settings.micro_batch, seed=settings.seed,
                                      device=torch.device(device), num_workers=num_workers)
    return [fit_probe(name, train_source, val_features, num_classes=num_classes, num_heads=encoder.num_heads,
                      settings=settings, device=device, csv_path=os.path.join(out_dir, f"{tag}{name}.csv"),
                      progress=progress, desc=f"{tag}{name} probe") for name in probes]


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def results_table(results: Sequence[ProbeResult]) -> str:
    return format_table(["probe", "val top-1 %", "val top-5 %", "epochs", "seconds"],
                        [[r.probe, f"{r.top1:.2f}", "-" if r.top5 is None else f"{r.top5:.2f}", len(r.history),
                          f"{r.seconds:.0f}"] for r in results])
