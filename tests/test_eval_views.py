import numpy as np
import pytest
import torch

from vjepa_fast.dali_pipelines.sampling import centre_square_box, frame_indices
from vjepa_fast.dali_pipelines.transform import clip_tensor
from data_fixtures import write_video
from vjepa_fast.eval.views import (ViewSpec, image_views, read_image_folder, segment_frame_indices,
                                   spatial_view_boxes, video_views)


def test_one_segment_is_the_centred_eval_clip():
    for video_frames in (100, 64, 65, 20):
        np.testing.assert_array_equal(segment_frame_indices(video_frames, 16, 4, 1)[0],
                                      frame_indices(video_frames, 16, 4, None))


def test_segments_are_centred_in_equal_parts_and_stay_inside_the_video():
    indices = segment_frame_indices(800, 16, 4, 8)  # 8 parts of 100 frames, 64-frame spans
    assert indices.shape == (8, 16)
    centres = indices.mean(axis=1)
    np.testing.assert_allclose(centres, np.arange(8) * 100 + 50, atol=2.5)
    short = segment_frame_indices(80, 16, 4, 4)  # spans overlap and clamp at both ends
    assert short.min() == 0 and short.max() == 79
    assert (np.diff(short[:, 0]) >= 0).all()
    tiny = segment_frame_indices(10, 16, 4, 2)  # shorter than the span: the whole video, last frame repeated
    assert tiny.max() == 9 and (tiny[:, -1] == 9).all()


def test_spatial_views_run_along_the_long_side():
    assert spatial_view_boxes(90, 160, 3) == [(0, 0, 90, 90), (0, 35, 90, 90), (0, 70, 90, 90)]
    assert spatial_view_boxes(160, 90, 3) == [(0, 0, 90, 90), (35, 0, 90, 90), (70, 0, 90, 90)]
    assert spatial_view_boxes(90, 160, 1) == [centre_square_box(90, 160)]


def test_video_views_hold_every_segment_and_view(tmp_path):
    frames = np.repeat(np.arange(0, 240, 5, dtype=np.uint8)[:, None, None, None], 3, axis=3)  # grey ramp over time
    frames = np.broadcast_to(frames, (48, 24, 40, 3)).copy()
    frames[:, :, :8] = 0  # a dark left edge: only the left view sees it
    path = write_video(tmp_path / "ramp.webm", frames)
    views = video_views(path, ViewSpec(num_frames=4, sampling_rate=2, crop_size=16, num_segments=3, num_views=3))
    assert views.shape == (3, 3, 3, 4, 16, 16)
    brightness = views.mean(dim=(2, 3, 4, 5))  # [view, segment]
    assert (brightness[:, 1:] > brightness[:, :-1]).all()  # later segments are brighter
    assert (brightness[0] < brightness[1]).all() and torch.allclose(brightness[1], brightness[2], atol=0.05)


def test_image_is_repeated_into_a_still_clip(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    views = image_views(str(tmp_path / "img.png"), ViewSpec(num_frames=2, sampling_rate=4, crop_size=8, num_views=3))
    assert views.shape == (3, 1, 3, 2, 8, 8)
    assert torch.equal(views[:, :, :, 0], views[:, :, :, 1])
    centre = clip_tensor(pixels[None], (0, 5, 20, 20), 8, flip=False)  # [3, 1, 8, 8]
    torch.testing.assert_close(views[1, 0], centre.expand(-1, 2, -1, -1))


def test_image_folder_layout(tmp_path):
    from PIL import Image

    for split, names in (("train", ["cat", "dog"]), ("val", ["dog"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / name / "a.png")
            (tmp_path / split / name / "notes.txt").write_text("ignored")
    paths, labels, classes = read_image_folder(str(tmp_path), "train")
    assert classes == ["cat", "dog"] and labels == [0, 1] and all(p.endswith("a.png") for p in paths)
    assert read_image_folder(str(tmp_path), "val", classes)[1] == [1]  # the train split's label map
    with pytest.raises(FileNotFoundError, match="test"):
        read_image_folder(str(tmp_path), "test")
