"""Probe training batches computed online, as the official evals train: every epoch each training item is decoded,
freshly augmented (views.train_video_clips / train_image_clip, one sample per item) and run through the frozen
encoder. No training features are stored (K400 16x8 on ViT-L would be ~77 MB of float16 tokens per video); only
the deterministic val views are cached (features.py)."""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Sequence

import numpy as np
import torch

from ..dali_pipelines.bad_input import SkipTracker, VideoError
from ..dali_pipelines.loader import iterate, worker_options
from ..errors import UserError
from ..models import VisionTransformer
from .augment import Rngs
from .features import encode
from .protocols import Batch, epoch_batches, split
from .views import ViewSpec, train_image_clip, train_video_clips

LOADERS = {"video": train_video_clips, "image": train_image_clip}
MAX_DRAWS = 100  # consecutive unusable draws for one sample before giving up


class AugmentedDataset(torch.utils.data.Dataset):
    """Item i of epoch `self.epoch` -> (clips [S, 3, T, C, C], label, load attempts). An unusable item is replaced
    by a random other one (and its label), as the official loaders do; the draws are seeded by (seed, epoch, i)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], spec: ViewSpec, kind: str, seed: int):
        self.paths, self.labels, self.spec, self.load, self.seed = list(paths), list(labels), spec, LOADERS[kind], seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        rngs = Rngs.seeded(hash((self.seed, self.epoch, index)) % 2 ** 63)
        attempts = []
        for _ in range(MAX_DRAWS):
            try:
                clips = self.load(self.paths[index], self.spec, rngs)
                return clips, self.labels[index], attempts + [(index, None, None)]
            except VideoError as error:
                attempts.append((index, error.reason, error.detail))
                index = int(rngs.np.randint(len(self.paths)))
        failed = sorted({self.paths[i] for i, _, _ in attempts})
        raise UserError(f"{MAX_DRAWS} unusable items drawn in a row ({len(failed)} files: "
                        f"{', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); check the dataset")


def _collate(items):
    clips, labels, attempts = zip(*items)
    return torch.stack(clips), torch.tensor(labels), [a for attempt in attempts for a in attempt]


class EncodedBatches:
    """Training batches of augmented items through the frozen encoder (fit_probe's train source): each item once
    per epoch in a DistributedSampler's shuffle (seed + epoch), last batch smaller; a batch's micro-batches
    (tokens [b, S*N, D], labels) are decoded and encoded one at a time, as each official GPU does its share."""

    def __init__(self, encoder: VisionTransformer, paths: Sequence[str], labels: Sequence[int], spec: ViewSpec, *,
                 kind: str, batch_size: int, micro_batch: int, seed: int, device: torch.device, num_workers: int):
        self.encoder = encoder.to(device).eval()
        self.dataset = AugmentedDataset(paths, labels, spec, kind, seed)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size, self.micro_batch, self.seed = batch_size, micro_batch, seed
        self.device, self.num_workers = device, num_workers
        self.skips = SkipTracker(tuple(paths))

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.dataset.epoch = epoch  # workers start with each epoch's iteration and copy it
        batches = epoch_batches(len(self.dataset), self.batch_size, self.seed, epoch)
        chunks = [chunk.tolist() for items in batches for chunk in split(items, self.micro_batch)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=chunks, collate_fn=_collate,
                                             **worker_options(self.num_workers))
        encoded = self._encode(iterate(loader))
        for items in batches:  # fit_probe consumes a batch's micro-batches before asking for the next batch
            yield len(items), itertools.islice(encoded, math.ceil(len(items) / self.micro_batch))

    def _encode(self, loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for clips, labels, attempts in loader:
            self.skips.record(attempts)
            B, S = clips.shape[:2]
            tokens = encode(self.encoder, clips.to(self.device, non_blocking=True).flatten(0, 1))  # [B*S, N, D]
            yield tokens.reshape(B, S * tokens.size(1), tokens.size(2)), labels.to(self.device)
