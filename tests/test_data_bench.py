"""bench/data.py at tiny size: every loader runs on the same files and the results are written."""
import json

from bench.data import main
from vjepa_fast.dali_pipelines.choose import dali_installed


def test_data_bench_smoke(tmp_path):
    report = main(["--out", str(tmp_path), "--videos", "2", "--frames", "24", "--size", "32x48", "--num-frames", "4",
                   "--sampling-rate", "2", "--crop-size", "16", "--batch-size", "2", "--batches", "2", "--rounds", "1",
                   "--workers", "0", "--step-clips-per-s", "10"])
    expected = {"pyav", "baseline"} | ({"dali-cpu"} if dali_installed() else set())
    assert expected <= set(report["clips_per_s"]) and all(v > 0 for v in report["clips_per_s"].values())
    assert report["speedup_vs_baseline"]["baseline"] == 1.0 and set(report["vs_step"]) == set(report["clips_per_s"])
    assert json.loads((tmp_path / "data.json").read_text()) == report
    table = (tmp_path / "data.md").read_text()
    assert all(f"| {name} |" in table for name in report["clips_per_s"])
