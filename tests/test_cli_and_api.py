"""The command line's errors (one line for what a user can fix, a traceback for a bug) and the Python API from a
plain script."""
import subprocess
import sys
import textwrap

import pytest

from vjepa_fast import cli


def test_a_user_error_is_one_line_and_debug_shows_its_traceback(capsys):
    assert cli.main(["train", "--config", "no_such_config", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vjepa-fast: error: config file not found: no_such_config")
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        cli.main(["train", "--config", "no_such_config", "--debug"])
    assert cli.main(["train", "--set", "data.crop_size=30"]) == 2  # a ConfigError
    assert "data.crop_size=30" in capsys.readouterr().err


def test_a_bug_shows_its_traceback(monkeypatch):
    import vjepa_fast.train

    def buggy(*args, **kwargs):
        raise ValueError("an internal inconsistency")  # not a UserError: nothing the user can fix

    monkeypatch.setattr(vjepa_fast.train, "train", buggy)
    with pytest.raises(ValueError, match="an internal inconsistency"):
        cli.main(["train", "--max-steps", "1"])


def test_a_script_without_a_main_guard_builds_the_training_loader(tmp_path):
    pytest.importorskip("av", reason="PyAV decodes the synthetic videos")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""\
        from vjepa_fast.config import load_config
        from vjepa_fast.data import build_train_loader
        from vjepa_fast.synthetic import ensure_synthetic_dataset

        data = ensure_synthetic_dataset({str(tmp_path / "data")!r}, num_videos=8, frames=16, size=40, progress=False)
        cfg = load_config("demo", ["data.num_workers=2", "data.batch_size=2", "data.crop_size=32",
                                   "data.num_frames=4"])
        loader = build_train_loader(cfg, [data.motion_train_csv])
        print("batch", tuple(next(loader)[0].shape))
        loader.close()
        """))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "batch (2, 3, 4, 32, 32)"
