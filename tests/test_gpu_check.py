"""bench/gpu_check.sh --dry-run: every stage's command runs on the CPU at demo size, so a rename or a changed
option cannot break the GPU check unnoticed. The official step runs too when VJEPA_FAST_OFFICIAL_DIR names a copy
of the folder holding jepa_step.py and the official source (.ci/run sets it where one exists)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = os.environ.get("VJEPA_FAST_OFFICIAL_DIR")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    official = ["--official", OFFICIAL] if OFFICIAL else []
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", *official, str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    return proc, out


def test_every_stage_runs_and_succeeds(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "gpu_check.log").read_text()
    stages = re.findall(r"^=== (\S+): (exit \d+|skipped.*)", log, flags=re.M)
    expected = ["env", "ceilings", "gpu-tests", *(["official"] if OFFICIAL else []), "step-demo", "kernels",
                "gpu-tests-rope", "step-demo"]
    assert [name for name, _ in stages if not _.startswith("skipped (no --official")] == expected, stages
    assert all(status == "exit 0" for name, status in stages if name in expected), stages
    assert "deselected" in log and "error" not in log.split("=== gpu-tests")[1].split("===")[0].lower()


def test_results_fit_what_the_device_tool_brings_back(dry_run):
    _, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    assert files == sorted(["gpu_check.log", "ceilings.json", "kernels.json", "step_demo.json", "step_demo.png",
                            *(["official.json"] if OFFICIAL else [])])


def test_summary_compares_the_official_step_with_ours(dry_run):
    proc, _ = dry_run
    summary = proc.stdout.split("================ summary ================")[1]
    assert "ours ms/iter: " in summary and "| ours: fast compiled (sdpa) |" in summary
    if not OFFICIAL:
        pytest.skip("VJEPA_FAST_OFFICIAL_DIR is not set: the official step did not run")
    official = float(re.search(r"official ms/iter: ([\d.]+)", summary)[1])
    ours = float(re.search(r"ours ms/iter: ([\d.]+)", summary)[1])
    ratio = float(re.search(r"ratio \(official / ours\): ([\d.]+)x", summary)[1])
    assert ratio == pytest.approx(official / ours, rel=0.01)
    assert re.search(r"\| official \| [\d.]+ \| [\d.]+ \| [\d.]+% \|", summary)
