"""StepLoader, the interface every loader has, and the PyAV clip loader: an infinite, step-indexed stream of
(clips, labels) batches decoded on the CPU, any codec.

Batch k of a rank holds stream positions k*B .. k*B+B-1 (sample_order.py), and every random choice of a clip comes
from a generator seeded by (seed, global sample position, attempt), never from worker state (clip_plan.py). So batch
k is a pure function of (seed, k, rank, world_size, dataset) whatever the number of workers, and start_step=k
resumes exactly. A bad video is replaced by a fresh deterministic draw (attempt + 1) and reported to the main
process with the batch, where bad_input.SkipTracker counts and logs it.
"""
import contextlib
import multiprocessing
import sys

import torch

from .bad_input import SkipTracker
from .clip_plan import ClipPlan, load_first_usable
from .dataset_file import DatasetIndex
from .pyav_decode import read_frames
from .sample_order import SampleOrder
from .spec import ClipSpec
from .transform import clip_tensor


def worker_context(num_workers: int):
    """The multiprocessing context for DataLoader workers: a fork server, not a fork of this process. A fork
    copies the locks that other threads hold at that moment (torch.compile's workers, a profiler, a process
    group, a DALI pipeline) and its child can deadlock on them."""
    if num_workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy", "av", __name__])  # one that does not import is skipped
    return context


@contextlib.contextmanager
def _main_script_hidden():
    """Hide the __main__ module's file and spec from multiprocessing while workers start. A fork-server (or spawned)
    child otherwise runs the main script again before it unpickles its work; a script that builds a loader at its
    top level, without `if __name__ == "__main__":`, would then start workers from within a worker and die. Our
    workers need nothing from __main__, so they skip it, as they do for a notebook (whose __main__ has no file)."""
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__.pop(name) for name in ("__file__", "__spec__") if main and name in main.__dict__}
    if main is not None:
        main.__spec__ = None  # getattr(main.__spec__, "name", None) must find no module name
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def iterate(data_loader: torch.utils.data.DataLoader):
    """iter(data_loader): its worker processes (started here) do not run the __main__ script again."""
    with _main_script_hidden():
        return iter(data_loader)


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
        return load_first_usable(self.dataset, self.spec, self.seed, key, self.decode)

    def decode(self, plan: ClipPlan) -> torch.Tensor:
        """The planned clip, decoded with PyAV and augmented on the CPU."""
        frames = read_frames(plan.path, plan.frames, plan.info)
        return clip_tensor(frames, plan.box, self.spec.crop_size, plan.flip)


class StepBatches:
    """Batch sampler: the keys of batches start_step, start_step+1, ... of one rank, forever."""

    def __init__(self, order: SampleOrder, batch_size: int, start_step: int):
        self.order = order
        self.batch_size = batch_size
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.order.batch(step, self.batch_size)
            step += 1


def collate_clips(items):
    """Stack a batch's clips (default_collate: in a worker, straight into shared memory, saving a copy) and labels;
    concatenate their load attempts."""
    clips, labels, attempts = zip(*items)
    return (torch.utils.data.default_collate(list(clips)), torch.tensor(labels, dtype=torch.int64),
            [a for item in attempts for a in item])


class StepLoader:
    """Iterator of (clips float32 [B, 3, T, S, S], labels int64 [B]); `step` is the index of the next batch, and
    `samples_per_epoch` the number of clips of one pass over the dataset on this rank.

    `stats` counts skipped videos by reason, `bad_files` maps each skipped path (logged once) to its reason.
    """

    def __init__(self, dataset: DatasetIndex, *, start_step: int, rank: int, world_size: int, seed: int):
        self.order = SampleOrder(len(dataset), seed, rank, world_size, dataset.probabilities)
        self.step = start_step
        self.samples_per_epoch = self.order.per_rank  # this rank's clips per pass over the dataset ("ipe" x batch)
        self.skips = SkipTracker(dataset.paths)

    def __iter__(self):
        return self

    def close(self) -> None:
        """Release workers and pipelines now rather than when the loader is garbage-collected."""

    @property
    def stats(self) -> dict[str, int]:
        """Skipped videos so far by reason (every SKIP_REASONS key; a file skipped twice counts twice)."""
        return dict(self.skips.counts)

    @property
    def bad_files(self) -> dict[str, str]:
        """path -> skip reason of every distinct file skipped (and logged) so far."""
        return dict(self.skips.bad_files)


class PyAVClipLoader(StepLoader):
    """The PyAV StepLoader. One DataLoader iterator lives as long as the loader, so its workers persist and
    prefetch."""
    clip_dataset = ClipDataset  # how a clip is decoded (bench/data.py swaps in its baseline)

    def __init__(self, dataset: DatasetIndex, spec: ClipSpec, *, batch_size: int, seed: int, start_step: int,
                 rank: int, world_size: int, num_workers: int):
        super().__init__(dataset, start_step=start_step, rank=rank, world_size=world_size, seed=seed)
        data_loader = torch.utils.data.DataLoader(
            self.clip_dataset(dataset, spec, seed),
            batch_sampler=StepBatches(self.order, batch_size, start_step),
            collate_fn=collate_clips,
            num_workers=num_workers,
            multiprocessing_context=worker_context(num_workers),
            pin_memory=torch.cuda.is_available(),
        )
        self._batches = iterate(data_loader)

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
        shutdown_workers = getattr(self._batches, "_shutdown_workers", None)  # absent with num_workers=0
        if shutdown_workers is not None:
            shutdown_workers()
