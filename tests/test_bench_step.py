"""Smoke tests of the CPU-runnable benchmark commands (no timing asserts)."""
import importlib.util
import json

import pytest

from helpers import TINY
from vjepa_fast import cli


def _sets(*extra):
    return [x for o in [*TINY, *extra] for x in ("--set", o)]


def test_bench_step_writes_results_and_parity(tmp_path, capsys):
    assert cli.main(["bench", "step", "--steps", "2", "--warmup", "1", "--out", str(tmp_path), *_sets()]) == 0
    result = json.loads((tmp_path / "step_demo.json").read_text())
    paths = [v["path"] for v in result["variants"]]
    assert paths == ["reference", "fast"]
    fast = result["variants"][1]
    assert fast["loss_rel_err"] < 1e-5 and fast["grad_rel_err"] < 1e-4  # fp32 CPU: the same function
    assert set(fast["stages_ms"]) == {"data", "masks", "target", "context", "predictor", "loss", "backward",
                                      "optimizer", "ema"}
    assert all(v["step_ms"] > 0 and v["mfu"] > 0 for v in result["variants"])
    assert (tmp_path / "step_demo.png").stat().st_size > 0
    assert "| fast | sdpa |" in capsys.readouterr().out


def test_a_failing_backend_is_reported_without_losing_the_others(tmp_path, capsys):
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed: its CPU failure mode differs")
    args = ["bench", "step", "--steps", "1", "--warmup", "0", "--no-parity", "--backends", "sdpa,xformers",
            "--out", str(tmp_path), *_sets()]
    assert cli.main(args) == 0
    variants = json.loads((tmp_path / "step_demo.json").read_text())["variants"]
    assert [(v["path"], v["backend"], v["error"] is None) for v in variants] == [
        ("reference", "sdpa", True), ("fast", "sdpa", True), ("fast", "xformers", False)]
    assert "needs the xformers package" in variants[2]["error"]
    assert "| fast | xformers | failed: RuntimeError" in capsys.readouterr().out


def test_profile_writes_a_chrome_trace_with_stage_ranges(tmp_path):
    assert cli.main(["profile", "--steps", "1", "--out", str(tmp_path), *_sets()]) == 0
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"target", "context", "predictor", "loss", "backward", "optimizer", "ema"} <= names


def test_pytest_benchmark_suite_runs(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "bench/bench_cpu.py", "--benchmark-disable",
                          "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout


def test_mask_benchmark_reports_both_generators():
    from bench import masks

    result = masks.run(batch=4, steps=2)
    assert result["loop_ms"] > 0 and result["vectorised_ms"] > 0 and result["speedup"] > 0
