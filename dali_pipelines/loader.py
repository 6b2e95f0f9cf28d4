"""StepLoader, the interface every loader has, and the PyAV clip loader: an infinite, step-indexed stream of
(clips, labels) batches decoded on the CPU, any codec.

Batch k of a rank holds stream positions k*B .. k*B+B-1 (sample_order.py), and every random choice of a clip comes
from a generator seeded by (seed, global sample position, attempt), never from worker state (clip_plan.py). So batch
k is a pure function of (seed, k, rank, world_size, dataset) whatever the number of workers, and start_step=k
resumes exactly. A bad video is replaced by a fresh deterministic draw (attempt + 1) and reported to the main
process with the batch, where bad_input.SkipTracker counts and logs it.

The same purity makes worker deaths harmless: when a decode worker dies (the OOM killer, a decoder crash), the
loader starts fresh workers at the next batch not yet returned, and the stream goes on unchanged. And the workers
watch the main process, so a killed run leaves no worker or fork server behind.
"""
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time

import torch

from ..errors import RunStopped
from ..processes import process_gone
from .bad_input import SkipTracker
from .clip_plan import ClipPlan, load_first_usable
from .dataset_file import DatasetIndex
from .pyav_decode import read_frames
from .sample_order import SampleOrder
from .spec import ClipSpec
from .transform import clip_tensor

log = logging.getLogger(__name__)

MAX_WORKER_RESTARTS = 3  # worker restarts in a row (no batch in between) before the loader gives up
MAIN_PROCESS_POLL_S = 1.0  # how often a worker checks that the main process still runs


def worker_context():
    """The multiprocessing context for DataLoader workers: a fork server, not a fork of this process. A fork
    copies the locks that other threads hold at that moment (torch.compile's workers, a profiler, a process
    group, a DALI pipeline) and its child can deadlock on them."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy", "av", __name__])  # one that does not import is skipped
    return context


def worker_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for `num_workers` worker processes: started by the fork server (worker_context)
    and ending when this process ends, even by `kill -9` (exit_with_main)."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": worker_context(),
            "worker_init_fn": functools.partial(exit_with_main, os.getpid())}


def exit_with_main(main_pid: int, worker_id: int) -> None:
    """worker_init_fn: end this worker soon after process `main_pid` is gone. Torch's own watchdog watches the
    worker's parent, the fork server, which lives as long as its workers: without this, a killed run's workers
    and fork server would run on forever. (The fork server exits by itself once its workers are gone.)"""
    def watch():
        while not process_gone(main_pid):
            time.sleep(MAIN_PROCESS_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name=f"exit-with-{main_pid}", daemon=True).start()


def dead_workers(batches, wait_s: float = 0.0) -> list:
    """The worker processes of a DataLoader iterator that have ended (none without workers), waiting up to
    `wait_s` for one to end (an error can reach us a moment before the fork server reports the death)."""
    workers = getattr(batches, "_workers", [])
    if workers:
        multiprocessing.connection.wait([worker.sentinel for worker in workers], timeout=wait_s)
    return [worker for worker in workers if not worker.is_alive()]


def exit_reason(exitcode: int | None) -> str:
    """How a process ended, in words: "killed by SIGKILL", "exit code 1"."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


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


def collate_clips(items, lengths: tuple[int, ...]):
    """Stack a batch's clips (default_collate: in a worker, straight into shared memory, saving a copy) and labels;
    concatenate their load attempts. With several clip `lengths` (ClipSpec.clip_lengths), one stack per length
    present, in that order (as the official collator groups them): lists of clips and labels."""
    clips, labels, attempts = zip(*items)
    attempts = [a for item in attempts for a in item]
    if len(lengths) == 1:
        return torch.utils.data.default_collate(list(clips)), torch.tensor(labels, dtype=torch.int64), attempts
    groups = [[i for i, clip in enumerate(clips) if clip.shape[1] == length] for length in lengths]
    groups = [g for g in groups if g]
    return ([torch.utils.data.default_collate([clips[i] for i in g]) for g in groups],
            [torch.tensor([labels[i] for i in g], dtype=torch.int64) for g in groups], attempts)


class StepLoader:
    """Iterator of (clips float32 [B, 3, T, S, S], labels int64 [B]); with several clip lengths (ClipSpec
    .source_frames), lists of them, one per length present in the batch. `step` is the index of the next batch, and
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
    prefetch; if a worker dies, a fresh iterator replaces it, starting at the next batch not yet returned."""
    clip_dataset = ClipDataset  # how a clip is decoded (bench/data.py swaps in its baseline)

    def __init__(self, dataset: DatasetIndex, spec: ClipSpec, *, batch_size: int, seed: int, start_step: int,
                 rank: int, world_size: int, num_workers: int):
        super().__init__(dataset, start_step=start_step, rank=rank, world_size=world_size, seed=seed)
        self._clips = self.clip_dataset(dataset, spec, seed)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._restarts = 0  # worker restarts since the last batch returned
        self._batches = self._start(start_step)

    def _start(self, step: int):
        """A DataLoader iterator, with its own fresh workers, over batches step, step + 1, ..."""
        data_loader = torch.utils.data.DataLoader(
            self._clips,
            batch_sampler=StepBatches(self.order, self.batch_size, step),
            collate_fn=functools.partial(collate_clips, lengths=self._clips.spec.clip_lengths),
            pin_memory=torch.cuda.is_available(),
            **worker_options(self.num_workers),
        )
        return iterate(data_loader)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            clips, labels, attempts = self._next_batch()
            self.skips.record(attempts)
        except BaseException:
            self.close()  # the exception's traceback keeps the DataLoader alive: stop its workers now
            raise
        self.step += 1
        return clips, labels

    def _next_batch(self):
        """Batch self.step from the DataLoader iterator, replacing the iterator as long as its workers die."""
        while True:
            try:
                batch = next(self._batches)
            except Exception as error:
                # A dead worker shows as torch's RuntimeError "DataLoader worker ... exited unexpectedly", or as
                # an OSError when a batch it had sent refers to its shared memory; other errors propagate.
                dead = dead_workers(self._batches, wait_s=1.0)
                if not dead:
                    raise
                self._replace_workers(dead, error)
            else:
                self._restarts = 0
                return batch

    def _replace_workers(self, dead: list, error: Exception) -> None:
        """Shut the broken iterator down and start a fresh one at self.step (batches the old one prefetched are
        decoded again, identically); raise RunStopped once workers die MAX_WORKER_RESTARTS times in a row."""
        deaths = ", ".join(f"pid {worker.pid} ({exit_reason(worker.exitcode)})" for worker in dead)
        self.close()
        if self._restarts >= MAX_WORKER_RESTARTS:
            raise RunStopped(
                f"data loader workers keep dying: worker {deaths} died at step {self.step} after "
                f"{self._restarts} restarts without a batch in between; use fewer data.num_workers (now "
                f"{self.num_workers}) or check the memory (an OOM kill shows in `dmesg`)") from error
        self._restarts += 1
        log.warning("data loader worker %s died at step %d; starting fresh workers from step %d (restart %d of "
                    "at most %d in a row)", deaths, self.step, self.step, self._restarts, MAX_WORKER_RESTARTS)
        self._batches = self._start(self.step)

    def close(self) -> None:
        shutdown_workers = getattr(self._batches, "_shutdown_workers", None)  # absent with num_workers=0
        if shutdown_workers is not None:
            shutdown_workers()
