"""Plain transcriptions of the official V-JEPA data code, shared by the tests that check ours against it."""
import math

import numpy as np


def official_clip_indices(app, video_len, avg_fps, fpc, frame_step, fps, duration, filter_short_videos, randint):
    """VideoDataset.loadvideo_decord of the official loaders (V-JEPA 2: vjepa2/src/datasets/video_dataset.py; V-JEPA 1:
    jepa/src/datasets/video_dataset.py, which has no fps and does not round the frame rate up for duration), with
    num_clips=1, random_clip_sampling=True, allow_clip_overlap=False: the clip's frame indices, or None for a video
    it skips. `randint` stands for np.random.randint."""
    fstp = frame_step
    if duration is not None or fps is not None:
        video_fps = math.ceil(avg_fps) if app == "vjepa2" else avg_fps
        if duration is not None:
            fstp = int(duration * video_fps / fpc)
        else:
            fstp = video_fps // fps
    assert fstp is not None and fstp > 0
    clip_len = int(fpc * fstp)
    if filter_short_videos and video_len < clip_len:
        return None
    partition_len = video_len // 1
    if partition_len > clip_len:
        end_indx = randint(clip_len, partition_len)
        start_indx = end_indx - clip_len
        indices = np.linspace(start_indx, end_indx, num=fpc)
        indices = np.clip(indices, start_indx, end_indx - 1).astype(np.int64)
    else:
        indices = np.linspace(0, partition_len, num=partition_len // fstp)
        indices = np.concatenate((indices, np.ones(fpc - partition_len // fstp) * partition_len,))
        indices = np.clip(indices, 0, partition_len - 1).astype(np.int64)
    return indices


def official_indices(video_len, fpc, fstp, end_indx):
    """The official loadvideo_decord index code for num_clips=1, allow_clip_overlap=False, its random clip end
    fixed at `end_indx`."""
    return official_clip_indices("vjepa2", video_len, 0.0, fpc, fstp, None, None, False,
                                 randint=lambda low, high: end_indx)
