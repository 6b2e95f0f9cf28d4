"""Eval views against plain transcriptions of the official eval loaders (jepa/src/datasets/video_dataset.py,
evals/video_classification_frozen/utils.py, evals/image_classification_frozen/eval.py)."""
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_fixtures import write_video
from vjepa_fast.dali_pipelines.pyav_decode import probe_video, read_frames
from vjepa_fast.eval.views import ViewSpec, image_views, read_image_folder, segment_frame_indices, video_views

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _official_clip_indices(num_frames_in_video, fpc, fstp, num_clips):
    """VideoDataset.loadvideo_decord's index computation with allow_clip_overlap=True, random_clip_sampling=True."""
    clip_len = int(fpc * fstp)
    partition_len = num_frames_in_video // num_clips
    clip_indices = []
    for i in range(num_clips):
        if partition_len > clip_len:
            end_indx = clip_len
            end_indx = np.random.randint(clip_len, partition_len)
            start_indx = end_indx - clip_len
            indices = np.linspace(start_indx, end_indx, num=fpc)
            indices = np.clip(indices, start_indx, end_indx - 1).astype(np.int64)
            indices = indices + i * partition_len
        else:
            sample_len = min(clip_len, num_frames_in_video) - 1
            indices = np.linspace(0, sample_len, num=sample_len // fstp)
            indices = np.concatenate((indices, np.ones(fpc - sample_len // fstp) * sample_len,))
            indices = np.clip(indices, 0, sample_len - 1).astype(np.int64)
            clip_step = 0
            if num_frames_in_video > clip_len:
                clip_step = (num_frames_in_video - clip_len) // (num_clips - 1)
            indices = indices + i * clip_step
        clip_indices.append(indices)
    return clip_indices


@pytest.mark.parametrize("fpc,fstp,num_clips", [(16, 4, 8), (16, 4, 2), (16, 4, 1), (8, 2, 3), (4, 3, 5)])
def test_segment_indices_are_the_official_ones_for_every_length(fpc, fstp, num_clips):
    for length in range(1, 700):
        np.random.seed(length)
        official = np.stack(_official_clip_indices(length, fpc, fstp, num_clips)) % length  # decord: -1 is the last
        ours = segment_frame_indices(length, fpc, fstp, num_clips, np.random.RandomState(length))
        np.testing.assert_array_equal(ours, official, err_msg=f"{length} frames")


def test_k400_lengths_give_15_distinct_frames_and_a_repeat():
    indices = segment_frame_indices(300, 16, 4, 8, np.random.RandomState(0))
    assert [len(set(clip)) for clip in indices] == [15] * 8 and indices[:, -1].tolist() == indices[:, -2].tolist()
    assert indices[:, 0].tolist() == [i * ((300 - 64) // 7) for i in range(8)]


def _official_resize(frames, size):
    """video_transforms.Resize(size, 'bilinear') on uint8 frames; cv2.resize INTER_LINEAR stood in for by
    bilinear interpolation without antialiasing, rounded to uint8."""
    im_h, im_w = frames.shape[1:3]
    if (im_w <= im_h and im_w == size) or (im_h <= im_w and im_h == size):
        return frames
    if im_w < im_h:
        ow, oh = size, int(size * im_h / im_w)
    else:
        oh, ow = size, int(size * im_w / im_h)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    return F.interpolate(x, size=(oh, ow), mode="bilinear").round().clamp(0, 255).permute(0, 2, 3, 1).numpy()


def _official_to_tensor(frames):
    """ClipToTensor then Normalize: [T, H, W, 3] -> [3, T, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(3, 0, 1, 2) / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)


def _official_eval_transform(frames, crop_size, num_views):
    """VideoTransform(training=False) (one view) or EvalVideoTransform (several)."""
    if num_views == 1:
        buffer = _official_resize(frames, int(crop_size * 256 / 224))
        im_h, im_w = buffer.shape[1:3]
        x1, y1 = int(round((im_w - crop_size) / 2.)), int(round((im_h - crop_size) / 2.))
        return [_official_to_tensor(buffer[:, y1:y1 + crop_size, x1:x1 + crop_size])]
    buffer = _official_resize(frames, crop_size)
    T, H, W, C = buffer.shape
    spatial_step = (max(H, W) - crop_size) // (num_views - 1)
    views = []
    for i in range(num_views):
        start = i * spatial_step
        view = buffer[:, start:start + crop_size, :, :] if H > W else buffer[:, :, start:start + crop_size, :]
        views.append(_official_to_tensor(view))
    return views


@pytest.mark.parametrize("num_views,shape", [(1, (27, 40)), (3, (27, 40)), (1, (40, 23)), (3, (40, 23))])
def test_video_views_are_the_official_eval_transform(tmp_path, num_views, shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(150, shape[0] // 2 * 2, shape[1] // 2 * 2, 3), dtype=np.uint8)
    path = write_video(tmp_path / "clip.webm", pixels)
    spec = ViewSpec(num_frames=4, sampling_rate=3, crop_size=16, num_segments=2, num_views=num_views)
    ours = video_views(path, spec)
    info = probe_video(path)
    np.random.seed(zlib.crc32(b"clip.webm"))  # our per-file draw for the long video's random clip places
    indices = np.concatenate(_official_clip_indices(info.num_frames, 4, 3, 2))
    buffer = read_frames(path, indices, info)
    clips = [buffer[i * 4:(i + 1) * 4] for i in range(2)]  # split_into_clips
    official = [_official_eval_transform(clip, 16, num_views) for clip in clips]  # [segment][view]
    assert ours.shape == (num_views, 2, 3, 4, 16, 16)
    for s in range(2):
        for v in range(num_views):
            torch.testing.assert_close(ours[v, s], official[s][v], atol=1e-5, rtol=1e-5)


def test_image_view_is_the_official_resize_and_centre_crop(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 75, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    views = image_views(str(tmp_path / "img.png"), ViewSpec(num_frames=3, sampling_rate=4, crop_size=28))
    # torchvision Resize(int(28 * 256 / 224)) (PIL bilinear, antialiased), CenterCrop(28), ToTensor, Normalize
    size = int(28 * 256 / 224)
    img = Image.open(tmp_path / "img.png").convert("RGB")
    w, h = img.size
    img = img.resize((int(size * w / h), size) if w > h else (size, int(size * h / w)), Image.BILINEAR)
    top, left = int(round((img.height - 28) / 2.0)), int(round((img.width - 28) / 2.0))
    crop = np.asarray(img)[top:top + 28, left:left + 28]
    expected = _official_to_tensor(crop[None])  # [3, 1, 28, 28]
    assert views.shape == (1, 1, 3, 3, 28, 28)
    for t in range(3):  # repeated into a still clip
        torch.testing.assert_close(views[0, 0, :, t], expected[:, 0], atol=1e-5, rtol=1e-5)


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
