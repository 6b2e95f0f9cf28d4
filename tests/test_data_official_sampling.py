"""Which frames a clip takes, and which files are skipped, for every case of the official V-JEPA loaders: a video
longer or shorter than the clip's span, frames sampled by step (sampling_rate), rate (fps) or span (clip_duration),
filter_short_videos, the file-size filter filter_long_videos, min_frames, and image entries. Checked against a
transcription of the official code (official_transcriptions.py), the loader's decoded clips, and the config keys."""
import dataclasses
import logging
import os

import numpy as np
import pytest
import torch

from vjepa_fast.config import ConfigError
from vjepa_fast.dali_pipelines import ClipSpec, choose, make_loader
from vjepa_fast.dali_pipelines import clip_plan
from vjepa_fast.dali_pipelines.bad_input import VideoError
from vjepa_fast.dali_pipelines.dataset_file import read_dataset_files
from vjepa_fast.dali_pipelines.dali_loader import DaliClipLoader
from vjepa_fast.dali_pipelines.pyav_decode import VideoInfo, probe_video, read_frames
from vjepa_fast.dali_pipelines.sample_order import CLIP_STREAM
from vjepa_fast.dali_pipelines.transform import clip_tensor
from vjepa_fast.data import clip_spec
from data_fixtures import frame_numbers, take, write_counting_video, write_dataset_file, write_image
from helpers import tiny_config
from official_transcriptions import official_clip_indices


def fake_probe(video_len, avg_fps):
    return lambda path: VideoInfo(video_len, None, "vp9", 48, 32, avg_fps, 1, video_len)


# (app whose rule the keys follow, ClipSpec keys): by step, by rate (V-JEPA 2), by span (V-JEPA 1's clip_duration)
SAMPLINGS = [("vjepa", dict(num_frames=16, sampling_rate=4)), ("vjepa", dict(num_frames=8, sampling_rate=2)),
             ("vjepa2", dict(num_frames=16, fps=4)), ("vjepa2", dict(num_frames=64, fps=4)),
             ("vjepa2", dict(num_frames=8, fps=8)), ("vjepa", dict(num_frames=8, duration=2.0)),
             ("vjepa", dict(num_frames=16, duration=0.5))]


@pytest.mark.parametrize("filter_short_videos", [False, True])
@pytest.mark.parametrize("app,keys", SAMPLINGS)
def test_frames_are_the_official_indices_for_every_case(monkeypatch, app, keys, filter_short_videos):
    spec = ClipSpec(crop_size=16, filter_short_videos=filter_short_videos, **keys)
    for avg_fps in (12.0, 23.976, 25.0, 29.97, 30.0, 60.0, 1.0):
        for video_len in (1, 2, 3, 11, 47, 48, 63, 64, 65, 100, 191, 192, 193, 300, 1000):
            monkeypatch.setattr(clip_plan, "probe_video", fake_probe(video_len, avg_fps))
            for seed in range(3):
                case = f"{app} {keys} filter_short_videos={filter_short_videos}: {video_len} frames at {avg_fps} fps"
                try:
                    expected = official_clip_indices(app, video_len, avg_fps, spec.num_frames,
                                                     keys.get("sampling_rate"), keys.get("fps"), spec.duration,
                                                     filter_short_videos, np.random.default_rng(seed).integers)
                except AssertionError:  # the official loader stops on a frame step of 0; ours skips the video
                    with pytest.raises(VideoError, match="unsupported"):
                        clip_plan.plan_clip("clip.webm", spec, np.random.default_rng(seed))
                    continue
                if expected is None:
                    with pytest.raises(VideoError, match="too_short"):
                        clip_plan.plan_clip("clip.webm", spec, np.random.default_rng(seed))
                    continue
                plan = clip_plan.plan_clip("clip.webm", spec, np.random.default_rng(seed))
                np.testing.assert_array_equal(plan.frames, expected, err_msg=case)


# 48 frames at 12 fps, fps 4 (step 3), 64 frames per clip (a 192-frame span): the official linspace(0, 48, 16)
# spreads 16 frames over the video, then repeats the last one 48 times
SHORT_12FPS_AT_4FPS = [0, 3, 6, 9, 12, 16, 19, 22, 25, 28, 32, 35, 38, 41, 44, 47] + [47] * 48


def test_the_issues_short_12fps_video_at_4fps_repeats_its_last_frame(monkeypatch):
    monkeypatch.setattr(clip_plan, "probe_video", fake_probe(48, 12.0))
    plan = clip_plan.plan_clip("ssv2.webm", ClipSpec(num_frames=64, fps=4, crop_size=16), np.random.default_rng(0))
    np.testing.assert_array_equal(plan.frames, SHORT_12FPS_AT_4FPS)


def test_a_short_video_is_decoded_with_its_last_frame_repeated(tmp_path):
    video = write_counting_video(tmp_path / "short.webm", 48, fps=12)
    dataset = write_dataset_file(tmp_path / "data.csv", [(video, 3)])
    spec = ClipSpec(num_frames=64, fps=4, crop_size=32, random_resize_scale=(1.0, 1.0),
                    random_resize_aspect_ratio=(1.5, 1.5), horizontal_flip=False)
    loader = make_loader([dataset], spec, batch_size=2, seed=0, num_workers=0, loader="pyav")
    (clips, labels), = take(loader, 1)
    assert clips.shape == (2, 3, 64, 32, 32) and labels.tolist() == [3, 3] and loader.bad_files == {}
    # the crop is the whole 48x32 frame: undo the normalisation and the resize, and read the frame numbers
    mean, std = torch.tensor((0.485, 0.456, 0.406)) * 255, torch.tensor((0.229, 0.224, 0.225)) * 255
    frames = clips[0].permute(1, 2, 3, 0) * std + mean  # [T, 32, 32, 3]
    frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(32, 48), mode="bilinear")
    numbers = frame_numbers(frames.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy())
    np.testing.assert_array_equal(numbers, SHORT_12FPS_AT_4FPS)


def test_filters_skip_with_their_reason(tmp_path, caplog):
    short = write_counting_video(tmp_path / "short.webm", 10)
    long = write_counting_video(tmp_path / "long.webm", 40)
    dataset = write_dataset_file(tmp_path / "data.csv", [(short, 0), (long, 1)])
    plain = ClipSpec(num_frames=4, sampling_rate=4, crop_size=16)  # the span is 16 frames
    for spec, bad in [(plain, {}),
                      (ClipSpec(num_frames=4, sampling_rate=4, crop_size=16, min_frames=12), {short: "too_short"}),
                      (ClipSpec(num_frames=4, sampling_rate=4, crop_size=16, filter_short_videos=True),
                       {short: "too_short"}),
                      (ClipSpec(num_frames=4, sampling_rate=4, crop_size=16,
                                filter_long_videos=os.path.getsize(short)), {long: "too_large"})]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vjepa_fast.dali_pipelines"):
            loader = make_loader([dataset], spec, batch_size=4, seed=0, num_workers=0, loader="pyav")
            take(loader, 2)
        assert loader.bad_files == bad
        for path, reason in bad.items():
            message, = [r.getMessage() for r in caplog.records if path in r.getMessage()]
            assert reason in message
    assert os.path.getsize(long) > os.path.getsize(short)
    with pytest.raises(VideoError, match=rf"too_large: {os.path.getsize(long)} bytes, more than the 100 of "
                                         r"data.filter_long_videos"):
        clip_plan.plan_clip(long, ClipSpec(num_frames=4, crop_size=16, filter_long_videos=100),
                            np.random.default_rng(0))


@pytest.mark.parametrize("name", ["still.png", "still.JPG"])
def test_an_image_entry_is_a_clip_of_that_image_repeated(tmp_path, name):
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = write_image(tmp_path / name, image)
    decoded = read_frames(path, np.zeros(1, np.int64), probe_video(path))[0]
    if name.endswith("png"):
        np.testing.assert_array_equal(decoded, image)
    dataset = write_dataset_file(tmp_path / "data.csv", [(path, 5)])
    # fps 50 is faster than any rate an image could be given: images are not sampled in time, so never skipped
    for keys in (dict(sampling_rate=4), dict(fps=50), dict(duration=1.0)):
        spec = ClipSpec(num_frames=6, crop_size=16, filter_short_videos=True, **keys)
        plan = clip_plan.plan_clip(path, spec, np.random.default_rng(1))
        np.testing.assert_array_equal(plan.frames, np.zeros(6))
        loader = make_loader([dataset], spec, batch_size=1, seed=3, num_workers=0, loader="pyav")
        (clips, labels), = take(loader, 1)
        draw = loader.order.batch(0, 1)[0][0]
        plan = clip_plan.plan_clip(path, spec, np.random.default_rng((3, CLIP_STREAM, draw, 0)))
        expected = clip_tensor(np.repeat(decoded[None], 6, axis=0), plan.box, 16, plan.flip)
        torch.testing.assert_close(clips[0], expected)
        assert labels.tolist() == [5] and loader.bad_files == {}


def test_auto_leaves_image_datasets_to_pyav_and_dali_skips_images(tmp_path, monkeypatch):
    image = write_image(tmp_path / "still.jpeg", np.full((16, 16, 3), 100, np.uint8))
    video = write_counting_video(tmp_path / "video.webm", 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(choose, "dali_installed", lambda: True)
    monkeypatch.setattr(choose, "probe_video", lambda path: dataclasses.replace(probe_video(path), codec="h264"))
    videos_only = read_dataset_files([write_dataset_file(tmp_path / "videos.csv", [(video, 0)])])
    assert choose.choose_loader("auto", videos_only).name == "dali"
    # the image in a second dataset file, after more videos than the codec probe samples
    dataset = read_dataset_files([write_dataset_file(tmp_path / "videos.csv", [(video, 0)] * 20),
                                  write_dataset_file(tmp_path / "images.csv", [(image, 1)])])
    choice = choose.choose_loader("auto", dataset)
    assert choice.name == "pyav" and image in choice.reason
    plan = clip_plan.plan_clip(image, ClipSpec(num_frames=4, crop_size=16), np.random.default_rng(0))
    with pytest.raises(VideoError, match="unsupported: an image"):
        DaliClipLoader.__new__(DaliClipLoader)._read(plan)  # its per-clip check, which needs no DALI


def test_config_keys_reach_the_clip_spec():
    spec = clip_spec(tiny_config())
    assert (spec.min_frames, spec.filter_short_videos, spec.filter_long_videos, spec.duration) == \
        (None, False, 10**9, None)
    cfg = tiny_config("data.filter_short_videos=true", "data.filter_long_videos=5000", "data.clip_duration=2.5",
                      "data.min_frames=3")
    spec = clip_spec(cfg)
    assert (spec.min_frames, spec.filter_short_videos, spec.filter_long_videos, spec.duration) == (3, True, 5000, 2.5)
    for overrides, message in [(["data.filter_long_videos=0"], "data.filter_long_videos=0: must be >= 1"),
                               (["data.clip_duration=0"], "data.clip_duration=0.0: must be > 0"),
                               (["data.sampling_rate=null", "data.fps=4", "data.clip_duration=2"],
                                "data.fps=4 and data.clip_duration=2: give one")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(*overrides)
