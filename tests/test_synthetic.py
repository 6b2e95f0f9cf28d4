"""The embedded synthetic dataset: cached generation, balanced labels, motion in the labelled direction."""
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from vjepa_fast.dali_pipelines import ClipSpec, make_loader, read_dataset_files
from data_fixtures import decode_all
from vjepa_fast import synthetic
from vjepa_fast.synthetic import ensure_synthetic_dataset, render_video

TINY = dict(num_videos=64, frames=12, size=40, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("cache")), **TINY)


def test_generation_is_cached(tiny_dataset, monkeypatch):
    cache = os.path.dirname(tiny_dataset.root)
    monkeypatch.setattr(synthetic.multiprocessing, "Pool", None)  # a rebuild would fail here
    assert ensure_synthetic_dataset(cache, **TINY) == tiny_dataset
    assert os.listdir(cache) == [os.path.basename(tiny_dataset.root)]
    assert f"synthetic-v{synthetic.VERSION}-" in tiny_dataset.root


def test_labels_are_balanced_and_splits_partition(tiny_dataset):
    for task, num_classes in (("motion", tiny_dataset.num_motion_classes),
                              ("appearance", tiny_dataset.num_appearance_classes)):
        everything = read_dataset_files(getattr(tiny_dataset, f"{task}_csv"))
        assert len(everything) == 64 and all(os.path.exists(path) for path in everything.paths)
        assert np.bincount(everything.labels, minlength=num_classes).tolist() == [64 // num_classes] * num_classes
        train = read_dataset_files(getattr(tiny_dataset, f"{task}_train_csv"))
        val = read_dataset_files(getattr(tiny_dataset, f"{task}_val_csv"))
        assert sorted(train.paths + val.paths) == sorted(everything.paths) and not set(train.paths) & set(val.paths)
    motion = read_dataset_files(tiny_dataset.motion_csv).labels
    appearance = read_dataset_files(tiny_dataset.appearance_csv).labels
    assert len(set(zip(motion.tolist(), appearance.tolist()))) == 64  # every pair once: labels independent


def torus_shift(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    """Integer (dx, dy) that best maps image `before` onto `after` with wrap-around (circular cross-correlation)."""
    correlation = np.fft.ifft2(np.fft.fft2(after - after.mean()) * np.conj(np.fft.fft2(before - before.mean())))
    dy, dx = np.unravel_index(np.argmax(correlation.real), correlation.shape)
    size = before.shape[0]
    return (dx + size // 2) % size - size // 2, (dy + size // 2) % size - size // 2


def test_shapes_move_in_the_labelled_direction(tiny_dataset):
    index = read_dataset_files(tiny_dataset.motion_csv)
    for path, direction in zip(index.paths, index.labels.tolist()):
        frames = decode_all(path).astype(np.float32)
        saturation = frames.max(axis=-1) - frames.min(axis=-1)  # high on the shapes; the background is near grey
        assert 0 < (saturation[0] > 90).mean() < 0.5
        dx, dy = torus_shift(saturation[0], saturation[11])
        assert 5 <= math.hypot(dx, dy) <= 9  # 11 frames at 0.5-0.75 px/frame (40 px frames)
        error = math.degrees(math.atan2(-dy, dx)) - direction * 45  # y points down: up is 90 degrees
        assert abs((error + 180) % 360 - 180) < 12, (path, direction, dx, dy)


def test_rendering_is_deterministic_in_the_seed():
    assert np.array_equal(render_video(0, 5, 4, 24), render_video(0, 5, 4, 24))
    assert not np.array_equal(render_video(0, 5, 4, 24), render_video(1, 5, 4, 24))


def test_the_loader_reads_it(tiny_dataset):
    spec = ClipSpec(num_frames=4, sampling_rate=2, crop_size=32)
    clips, labels = next(make_loader([tiny_dataset.motion_train_csv], spec, batch_size=4, seed=0, num_workers=0))
    assert clips.shape == (4, 3, 4, 32, 32) and labels.max() < 8


def test_abandoned_and_failed_builds_are_never_used(tmp_path, monkeypatch):
    params = dict(num_videos=2, frames=3, size=16, seed=0, progress=False)
    name = os.path.basename(ensure_synthetic_dataset(str(tmp_path / "probe"), **params).root)
    host = synthetic.socket.gethostname()
    finished = subprocess.Popen(["true"])
    finished.wait()
    abandoned = tmp_path / f".{name}.tmp-{host}-{finished.pid}-x"  # its builder is gone: cleaned
    in_progress = tmp_path / f".{name}.tmp-{host}-{os.getpid()}-y"  # its builder is alive: left alone
    for folder in (abandoned, in_progress):
        (folder / "videos").mkdir(parents=True)
    dataset = ensure_synthetic_dataset(str(tmp_path), **params)
    assert not abandoned.exists() and in_progress.exists()
    assert len(read_dataset_files(dataset.motion_csv)) == 2

    def interrupted(folder, num_videos):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_dataset_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(str(tmp_path / "other"), **{**params, "seed": 1})
    assert os.listdir(tmp_path / "other") == []  # neither a dataset folder nor a temporary one is left


def test_a_build_that_loses_the_race_uses_the_winners_dataset(tmp_path, monkeypatch):
    params = dict(num_videos=2, frames=3, size=16, seed=0, progress=False)
    final = tmp_path / os.path.basename(ensure_synthetic_dataset(str(tmp_path / "probe"), **params).root)
    write_dataset_files = synthetic._write_dataset_files

    def write_then_lose_the_race(folder, num_videos):
        write_dataset_files(folder, num_videos)
        shutil.copytree(folder, final)  # another process renames its finished build into place first

    monkeypatch.setattr(synthetic, "_write_dataset_files", write_then_lose_the_race)
    assert ensure_synthetic_dataset(str(tmp_path), **params).root == str(final)
    assert sorted(os.listdir(tmp_path)) == sorted(["probe", final.name])  # our temporary build is removed


def test_default_cache_dir_follows_the_environment(monkeypatch):
    monkeypatch.setenv("VJEPA_FAST_CACHE", "/somewhere/cache")
    assert synthetic.default_cache_dir() == "/somewhere/cache"
    monkeypatch.delenv("VJEPA_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert synthetic.default_cache_dir() == "/xdg/vjepa_fast"
