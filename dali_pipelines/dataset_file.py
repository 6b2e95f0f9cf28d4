"""Dataset files in the official V-JEPA format: one `path label` per line, space separated, no header.

Several files can be combined with per-file sampling weights (as the official DistributedWeightedSampler: each
sample of file f weighs weight_f / len(file_f)). Relative video paths resolve against the dataset file's folder.
"""
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class DatasetIndex:
    """All samples of the dataset files: video paths, int labels, the dataset file each came from, and sampling
    probabilities (None = uniform)."""
    paths: tuple[str, ...]
    labels: np.ndarray  # int64 [N]
    probabilities: np.ndarray | None  # float64 [N], sums to 1
    sources: np.ndarray | None = None  # int64 [N]: index of the dataset file (None: all from one file)

    def __post_init__(self):
        if self.sources is None:
            object.__setattr__(self, "sources", np.zeros(len(self.paths), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.paths)


def read_dataset_file(path: str) -> tuple[list[str], list[int]]:
    """The (video paths, labels) listed in one dataset file; a malformed line raises ValueError naming file and line."""
    folder = os.path.dirname(os.path.abspath(path))
    videos, labels = [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}, line {line_number}: not UTF-8 text: {raw[:80]!r}") from None
            tokens = line.split()
            if not tokens:
                continue  # blank lines are skipped, as pandas.read_csv does in the official loader
            if len(tokens) != 2:
                raise UserError(f"{path}, line {line_number}: expected 'path label', got {line.strip()!r}")
            video, label = tokens
            try:
                labels.append(int(label))
            except ValueError:
                raise UserError(f"{path}, line {line_number}: label {label!r} is not an integer") from None
            videos.append(os.path.join(folder, video))
    if not videos:
        raise UserError(f"dataset file {path} lists no videos")
    return videos, labels


def read_dataset_files(paths: Sequence[str], weights: Sequence[float] | None = None) -> DatasetIndex:
    """Read and concatenate dataset files; `weights` (one per file) make file f's share of the draws weights[f]."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("no dataset files given")
    if weights is not None and len(weights) != len(paths):
        raise UserError(f"got {len(weights)} dataset weights for {len(paths)} dataset files {list(paths)}")
    all_videos, all_labels, sample_weights, sources = [], [], [], []
    for file_number, path in enumerate(paths):
        videos, labels = read_dataset_file(path)
        all_videos += videos
        all_labels += labels
        sources += [file_number] * len(videos)
        if weights is not None:
            weight = float(weights[file_number])
            if not (np.isfinite(weight) and weight >= 0):
                raise UserError(f"weight {weights[file_number]!r} of dataset file {path} must be finite and >= 0")
            sample_weights += [weight / len(videos)] * len(videos)
    probabilities = None
    if weights is not None:
        probabilities = np.asarray(sample_weights, dtype=np.float64)
        if probabilities.sum() <= 0:
            raise UserError(f"dataset weights {list(weights)} are all zero")
        probabilities /= probabilities.sum()
    return DatasetIndex(tuple(all_videos), np.asarray(all_labels, dtype=np.int64), probabilities,
                        np.asarray(sources, dtype=np.int64))
