"""Training that survives kills, preemption and bad numbers (each run in a subprocess where a signal is involved)."""
import signal
import subprocess
import sys

import pytest
import torch

from helpers import TINY, metric_rows, run_training, start_training, subprocess_env, wait_for
from vjepa_fast.checkpoint import load_checkpoint, save_checkpoint, verify_checksum
from vjepa_fast.config import load_config
from vjepa_fast.errors import RunStopped
from vjepa_fast.model import VJEPA
from vjepa_fast.train import train

NETS = ("encoder", "predictor", "target_encoder")


def _overrides(dataset, *extra):
    return [*TINY, f"data.datasets=[{dataset.motion_train_csv}]", "logging.log_every=1", *extra]


def _assert_same_weights(a, b):
    for net in NETS:
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), f"{net}.{key}"


def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_weights(tiny_dataset, tmp_path):
    extra = ("logging.checkpoint_every=2",)
    run_training(tmp_path / "straight", 8, _overrides(tiny_dataset, *extra))
    proc = start_training(tmp_path / "killed", 8, _overrides(tiny_dataset, *extra))
    ckpt = tmp_path / "killed" / "checkpoints" / "latest.pt"
    wait_for(lambda: ckpt.exists() and len(metric_rows(tmp_path / "killed")) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["step"]
    assert 2 <= killed_at < 8
    run_training(tmp_path / "killed", 8, _overrides(tiny_dataset, *extra), resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 8
    _assert_same_weights(a, b)
    losses = [[r["loss"] for r in metric_rows(tmp_path / run)] for run in ("killed", "straight")]
    assert losses[0] == losses[1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    proc = start_training(run, 500, _overrides(tiny_dataset))
    wait_for(lambda: len(metric_rows(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert 3 <= state["step"] < 500 and state["step"] == len(metric_rows(run))
    run_training(run, state["step"] + 2, _overrides(tiny_dataset), resume=True)
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == state["step"] + 2


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": 1}, path)
    writer = (f"import torch; from vjepa_fast.checkpoint import save_checkpoint\n"
              f"big = torch.zeros(300_000_000, dtype=torch.uint8)\n"
              f"while True: save_checkpoint({{'step': 2, 'big': big}}, {str(path)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", writer], env=subprocess_env())
    wait_for(lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(path)["step"] in (1, 2)  # the old file, or a complete new one: never a torn one
    verify_checksum(path)  # and its checksum matches it (also when the kill came between the file and its checksum)
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    save_checkpoint({"step": 3}, path)  # the next save clears the killed writer's temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "latest.pt.sha256"]


def _nan_on_steps(monkeypatch, bad_calls):
    """Make VJEPA.loss return NaN on the given 0-based calls (one call per training step)."""
    calls = {"n": 0}
    original = VJEPA.loss

    def loss(self, *args, **kwargs):
        value, targets = original(self, *args, **{**kwargs, "return_targets": True})
        calls["n"] += 1
        if calls["n"] - 1 in bad_calls:
            value = value * float("nan")
        return (value, targets) if kwargs.get("return_targets") else value

    monkeypatch.setattr(VJEPA, "loss", loss)


def test_a_non_finite_step_is_skipped_without_touching_any_state(tiny_dataset, tmp_path, monkeypatch):
    cfg = load_config("demo", _overrides(tiny_dataset))
    train(cfg, tmp_path / "run", max_steps=1, progress=False)
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    _nan_on_steps(monkeypatch, {0})  # the resumed run's first step (step 1) is NaN
    result = train(cfg, tmp_path / "run", max_steps=2, resume=True, progress=False)
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert result.skipped_steps == 1 and after["skipped_steps"] == 1 and after["step"] == 2
    _assert_same_weights(before, after)
    opt_before, opt_after = before["optimizer"]["state"], after["optimizer"]["state"]
    for i, state in opt_before.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], opt_after[i][key])
    rows = metric_rows(tmp_path / "run")
    assert [r["skipped_step"] for r in rows] == ["0", "1"] and rows[1]["skipped_steps_total"] == "1"


def test_consecutive_non_finite_steps_stop_the_run_with_advice(tiny_dataset, tmp_path, monkeypatch):
    cfg = load_config("demo", _overrides(tiny_dataset, "optimization.max_consecutive_nonfinite=2"))
    _nan_on_steps(monkeypatch, set(range(100)))
    with pytest.raises(RunStopped, match=r"2 consecutive steps .* optimization.lr"):
        train(cfg, tmp_path / "run", max_steps=5, progress=False)


def test_out_of_memory_names_the_knobs(tiny_dataset, tmp_path, monkeypatch):
    import vjepa_fast.train as train_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_module, "train_step", oom)
    cfg = load_config("demo", _overrides(tiny_dataset))
    with pytest.raises(RuntimeError, match=r"data.batch_size=3.*activation_checkpointing"):
        train(cfg, tmp_path / "run", max_steps=2, progress=False)
