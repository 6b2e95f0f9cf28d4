"""Training, benchmarks and profiling on synthetic or in-memory data need neither PyAV nor NVIDIA DALI nor xformers
(GPU images often lack them), and the tests that do need them skip cleanly where they are missing."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("av", "nvidia.dali", "xformers")
# Any import of these then raises ImportError, as where they are not installed.
BLOCK = f"import sys\nfor name in {OPTIONAL!r}:\n    sys.modules[name] = None\n"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter; `env` set (a value None: removed) over this process's environment."""
    environ = {k: v for k, v in (os.environ | env).items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=environ)


def test_step_benchmark_runs_without_them(tmp_path):
    sets = [x for o in TINY for x in ("--set", o)]
    args = ["bench", "step", "--config", "demo", "--steps", "1", "--warmup", "1", *sets, "--out", str(tmp_path)]
    proc = _python(BLOCK + f"from vjepa_fast import cli\nsys.exit(cli.main({args!r}))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads((tmp_path / "step_demo.json").read_text())["variants"]
    assert [(v["label"], v["error"]) for v in variants] == [("reference", None), ("fast", None)]


COLLECT = BLOCK + "import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']))"


def test_pytest_collects_every_module_without_them():
    proc = _python(COLLECT, CI=None)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.match(r"\d+ tests collected in ", proc.stdout.strip().splitlines()[-1]), proc.stdout[-3000:]  # no errors


def test_on_ci_a_missing_dali_fails_the_collection_instead_of_skipping():
    proc = _python(COLLECT, CI="true")
    assert proc.returncode != 0
    assert "ERROR tests/test_dali_loader.py" in proc.stdout and "1 error" in proc.stdout, proc.stdout[-3000:]


def test_the_training_step_and_the_benchmarks_import_none_of_them():
    modules = ["vjepa_fast.train", "vjepa_fast.step", "vjepa_fast.eval", "vjepa_fast.cli", "vjepa_fast.bench.step",
               "vjepa_fast.bench.profile", "bench.kernels", "bench.official", "bench.summary"]
    proc = _python("import importlib, sys\n"
                   f"for name in {modules!r}:\n    importlib.import_module(name)\n"
                   f"print(sorted(name for name in {OPTIONAL!r} if name in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
