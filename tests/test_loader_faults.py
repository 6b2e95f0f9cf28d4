"""Loader faults: a decode worker that dies is replaced without changing the stream, repeated deaths stop the run
with a clear message, and a killed training process leaves no loader process running."""
import csv
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from helpers import TINY
from vjepa_fast.config import load_config
from vjepa_fast.dali_pipelines import ClipSpec, make_loader
from vjepa_fast.dali_pipelines.loader import MAX_WORKER_RESTARTS, PyAVClipLoader
from vjepa_fast.errors import RunStopped
from vjepa_fast.train import train
from data_fixtures import take

SMALL = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quick_death_check(monkeypatch):
    """Torch notices a dead fork-server worker only after its result queue has been silent for 5 s; look every
    0.5 s instead, to keep these tests short (the recovery itself is unchanged)."""
    try_get_data = _MultiProcessingDataLoaderIter._try_get_data
    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "_try_get_data",
                        functools.partialmethod(try_get_data, timeout=0.5))


def kill_worker(loader: PyAVClipLoader, index: int = 0) -> int:
    """SIGKILL one decode worker of the loader's current DataLoader iterator; returns its pid."""
    worker = loader._batches._workers[index]
    os.kill(worker.pid, signal.SIGKILL)
    return worker.pid


def assert_same_batches(batches, expected):
    assert len(batches) == len(expected)
    for step, ((clips, labels), (expected_clips, expected_labels)) in enumerate(zip(batches, expected)):
        assert torch.equal(clips, expected_clips) and torch.equal(labels, expected_labels), f"batch {step}"


@pytest.mark.parametrize("settle_s", [0, 2], ids=["while-decoding", "after-sending-its-batches"])
def test_a_killed_worker_is_replaced_and_the_stream_is_unchanged(tiny_dataset, quick_death_check, caplog,
                                                                 settle_s):
    # killed at once, the worker's death shows as silence; killed once its prefetched batches are sent, as the
    # failure to fetch their shared memory from it (an OSError, which torch turns into a RuntimeError when it has
    # seen the worker die)
    paths = [tiny_dataset.motion_train_csv]
    expected = take(make_loader(paths, SMALL, batch_size=3, seed=5, num_workers=0), 10)
    loader = make_loader(paths, SMALL, batch_size=3, seed=5, num_workers=2)
    try:
        batches = take(loader, 3)
        time.sleep(settle_s)
        old_workers = list(loader._batches._workers)
        pid = kill_worker(loader)
        with caplog.at_level(logging.WARNING, logger="vjepa_fast.dali_pipelines.loader"):
            batches += take(loader, 7)  # worker 0 holds batches 4 and 6 (round robin): its death shows by then
        assert loader.step == 10
        assert_same_batches(batches, expected)
        warnings = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
        assert len(warnings) == 1 and f"pid {pid} (killed by SIGKILL)" in warnings[0]
        assert not any(worker.is_alive() for worker in old_workers)  # the broken iterator was shut down
        assert all(worker.is_alive() for worker in loader._batches._workers)
    finally:
        loader.close()


def test_workers_that_keep_dying_stop_the_run(tiny_dataset, quick_death_check, monkeypatch):
    start = PyAVClipLoader._start

    def start_and_kill(self, step):  # every fresh iterator loses a worker at once
        batches = start(self, step)
        os.kill(batches._workers[0].pid, signal.SIGKILL)
        return batches

    monkeypatch.setattr(PyAVClipLoader, "_start", start_and_kill)
    loader = make_loader([tiny_dataset.motion_train_csv], SMALL, batch_size=3, seed=5, num_workers=2)
    with pytest.raises(RunStopped, match=rf"workers keep dying.*step 0 after {MAX_WORKER_RESTARTS} restarts.*"
                                         r"fewer data\.num_workers.*memory"):
        next(loader)
    assert not any(worker.is_alive() for worker in loader._batches._workers)  # closed on the way out


def test_other_loader_errors_are_not_retried(tiny_dataset, monkeypatch):
    loader = make_loader([tiny_dataset.motion_train_csv], SMALL, batch_size=3, seed=5, num_workers=0)

    def failing_batches():
        raise RuntimeError("bad data")
        yield

    monkeypatch.setattr(loader, "_start", lambda step: pytest.fail("restarted after an error that is no death"))
    monkeypatch.setattr(loader, "_batches", failing_batches())
    with pytest.raises(RuntimeError, match="bad data"):
        next(loader)
    assert loader.step == 0


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_training_survives_a_killed_worker_with_identical_losses(tiny_dataset, tmp_path, quick_death_check,
                                                                 monkeypatch, caplog):
    cfg = load_config("demo", [*TINY, f"data.datasets=[{tiny_dataset.motion_train_csv}]", "data.num_workers=2",
                               "logging.log_every=1", "logging.checkpoint_every=100"])
    steps = 8  # worker 0, killed before batch 2, holds batches 2, 4 and 6: its death shows within the run
    train(cfg, tmp_path / "undisturbed", max_steps=steps, progress=False)

    next_batch = PyAVClipLoader.__next__
    killed = []

    def kill_before_batch_2(self):
        if self.step == 2 and not killed:
            killed.append(kill_worker(self))
        return next_batch(self)

    monkeypatch.setattr(PyAVClipLoader, "__next__", kill_before_batch_2)
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.dali_pipelines.loader"):
        result = train(cfg, tmp_path / "disturbed", max_steps=steps, progress=False)
    assert result.end_step == steps and len(killed) == 1
    assert any(f"pid {killed[0]}" in r.getMessage() and "died" in r.getMessage() for r in caplog.records)
    losses = _losses(tmp_path / "disturbed")
    assert [step for step, _ in losses] == list(range(steps))
    assert losses == _losses(tmp_path / "undisturbed")  # the loss strings as written: bit-identical


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process now running."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (command name)"
        except OSError:  # it ended meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    children = {}
    for child, (parent, _) in _process_table().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pids) -> set[int]:
    """The pids that still run (a zombie, ended but not reaped, does not)."""
    table = _process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_killed_training_run_leaves_no_loader_process(tiny_dataset, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    sets = [*TINY, "data.num_workers=2", "logging.log_every=1", "logging.checkpoint_every=100000",
            f"data.datasets=[{tiny_dataset.motion_train_csv}]"]
    command = [sys.executable, "-m", "vjepa_fast.cli", "train", "--run-dir", str(run_dir), "--max-steps", "100000",
               "--no-progress", "--device", "cpu", *[x for option in sets for x in ("--set", option)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 40
        metrics = run_dir / "metrics.csv"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):  # header + 2 steps
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run wrote no 2 steps in 40 s"
            time.sleep(0.2)
        helpers = _descendants(process.pid)
        assert len(helpers) >= 3  # the fork server and 2 workers (and multiprocessing's resource tracker)
        process.kill()  # and not reaped yet: a zombie run must count as dead too
        deadline = time.monotonic() + 10
        while _running(helpers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _running(helpers)
    finally:
        process.kill()
        process.wait()
    for pid in left:  # leave nothing behind ourselves either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running 10 s after the run was killed: {sorted(left)}"
