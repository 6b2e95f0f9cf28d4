"""What a long run on a cluster meets, provoked one fault at a time, checking that nothing is lost: a requeued job
rerunning the same command, checkpoints kept and damaged by the file system, a full disk, a checkpoint that would
run code when loaded, gradient accumulation matching a larger batch, and a rank that stops answering."""
import csv
import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from helpers import TINY, tiny_config
from vjepa_fast import checkpoint as ckpt
from vjepa_fast import cli
from vjepa_fast import distributed as dist_utils
from vjepa_fast.config import load_config
from vjepa_fast.errors import RunStopped, UserError
from vjepa_fast.model import NETWORKS, VJEPA
from vjepa_fast.train import train


def _cfg(dataset, *extra):
    return load_config("demo", [*TINY, f"data.datasets=[{dataset.motion_train_csv}]", "logging.log_every=1",
                                "logging.checkpoint_every=1", *extra])


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _weights(run_dir):
    state = ckpt.load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    return {f"{net}.{k}": v for net in NETWORKS for k, v in state[net].items()}


def _files(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ---- 1. requeue-safe start ----------------------------------------------------------------------

def test_one_command_serves_the_first_start_and_every_requeue(tiny_dataset, tmp_path, caplog):
    cfg = _cfg(tiny_dataset, "logging.checkpoint_every=2")
    run = tmp_path / "run"
    (run).mkdir()
    (run / "metrics.csv").write_text("step,loss\n0,0.9\n")  # a job preempted before its first checkpoint
    with caplog.at_level("INFO"):
        first = train(cfg, run, resume=True, max_steps=2, progress=False)
    assert first.start_step == 0 and "starting a fresh run" in caplog.text
    again = train(cfg, run, resume=True, max_steps=4, progress=False)  # the requeue: the same command
    assert again.start_step == 2 and again.end_step == 4
    train(cfg, tmp_path / "straight", max_steps=4, progress=False)
    assert _losses(run) == _losses(tmp_path / "straight")
    with pytest.raises(FileExistsError, match="--resume"):  # never over a run by accident
        train(cfg, run, max_steps=4, progress=False)


# ---- 2. checkpoints that survive bad disks ------------------------------------------------------

def test_keep_last_and_keep_every(tiny_dataset, tmp_path):
    train(_cfg(tiny_dataset, "logging.keep_last=2", "logging.keep_every=3"), tmp_path / "run", max_steps=5,
          progress=False)
    assert _files(tmp_path / "run") == ["latest.pt", "latest.pt.sha256", "step_00000003.pt", "step_00000003.pt.sha256",
                                        "step_00000004.pt", "step_00000004.pt.sha256"]
    folder = tmp_path / "run" / "checkpoints"
    names = ("latest.pt", "step_00000004.pt", "step_00000003.pt")
    assert [ckpt.load_training_state(folder / name).step for name in names] == [5, 4, 3]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate], ids=["flipped byte", "truncated"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_used(tiny_dataset, tmp_path, caplog, damage):
    cfg = _cfg(tiny_dataset, "logging.keep_last=3")
    train(cfg, tmp_path / "straight", max_steps=4, progress=False)
    run = tmp_path / "run"
    train(cfg, run, max_steps=3, progress=False)
    damage(run / "checkpoints" / "latest.pt")  # the file system, after our atomic write
    resumed = train(cfg, run, resume=True, max_steps=4, progress=False)
    assert resumed.start_step == 2  # step_00000002.pt: the newest that verifies
    assert "UNUSABLE CHECKPOINT" in caplog.text and "latest.pt" in caplog.text
    assert any(name.startswith("latest.pt.damaged-") for name in _files(run))
    assert _losses(run) == _losses(tmp_path / "straight")  # steps 2 and 3 replayed exactly
    straight = _weights(tmp_path / "straight")
    assert all(torch.equal(v, straight[k]) for k, v in _weights(run).items())


def test_no_usable_checkpoint_stops_naming_them(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, "logging.keep_last=2")
    train(cfg, tmp_path / "run", max_steps=2, progress=False)
    for name in ("latest.pt", "step_00000001.pt"):
        _flip_a_byte(tmp_path / "run" / "checkpoints" / name)
    with pytest.raises(RunStopped, match=r"no usable checkpoint .*latest.pt .*damaged.*step_00000001.pt"):
        train(cfg, tmp_path / "run", resume=True, max_steps=3, progress=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_space(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset)
    run = tmp_path / "run"
    train(cfg, run, max_steps=1, progress=False)
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_fills_up)
    with pytest.raises(RunStopped, match=r"no space left on the device of .*checkpoints while writing "
                                         r"step_00000002.pt: about [\d.]+ GB needed, [\d.]+ GB free"):
        train(cfg, run, resume=True, max_steps=2, progress=False)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    latest = run / "checkpoints" / "latest.pt"
    ckpt.verify_checksum(latest)
    assert ckpt.load_training_state(latest).step == 1
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp file left


# ---- 3. safe loading ----------------------------------------------------------------------------

class _RunsACommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "the_command_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"encoder": {"patch_embed.proj.weight": _RunsACommand(marker)}}, evil)
    for load in (ckpt.load_checkpoint, ckpt.import_official, ckpt.load_encoder, ckpt.load_training_state):
        with pytest.raises(UserError, match=r"refused to load .*evil.pt: .*system.*could run code"):
            load(evil)
    args = ["eval", "--checkpoint", str(evil), "--benchmark", "synthetic", "--no-progress"]
    assert cli.main(args) == 2 and "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_official_checkpoints_load_safely(tmp_path):
    """The layout the official V-JEPA (1 and 2) training loops save: networks under DDP's `module.` (V-JEPA 2:
    and `backbone.`), AdamW state, the GradScaler state, epoch, loss, batch size, world size, lr."""
    model = VJEPA(tiny_config())
    optimizer = torch.optim.AdamW(model.encoder.parameters())
    model.encoder(torch.randn(1, 3, 4, 32, 32)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for prefix in ("module.", "module.backbone."):
        state = {n: {prefix + k: v for k, v in getattr(model, n).state_dict().items()} for n in NETWORKS}
        state.update(opt=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=3, loss=0.41, batch_size=24,
                     world_size=16, lr=6.25e-4)
        torch.save(state, tmp_path / "official.pth.tar")
        imported = ckpt.import_official(tmp_path / "official.pth.tar")
        assert imported["epoch"] == 3 and set(NETWORKS) <= set(imported)
        encoder = ckpt.load_encoder(tmp_path / "official.pth.tar", num_frames=4, num_heads=2)
        assert all(torch.equal(v, model.target_encoder.state_dict()[k]) for k, v in encoder.state_dict().items())


# ---- 6. gradient accumulation -------------------------------------------------------------------

def test_two_accumulation_steps_of_batch_4_equal_one_step_of_batch_8(tiny_dataset, tmp_path):
    big = _cfg(tiny_dataset, "data.batch_size=8")
    accumulated = _cfg(tiny_dataset, "data.batch_size=4", "optimization.accumulation_steps=2")
    train(big, tmp_path / "big", max_steps=3, progress=False)
    train(accumulated, tmp_path / "accumulated", max_steps=2, progress=False)
    resumed = train(accumulated, tmp_path / "accumulated", max_steps=3, resume=True, progress=False)
    assert resumed.start_step == 2  # resume works on whole steps
    a, b = _losses(tmp_path / "big"), _losses(tmp_path / "accumulated")
    assert a.keys() == b.keys() == {0, 1, 2}
    assert all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    big_w = _weights(tmp_path / "big")
    assert all((v - big_w[k]).abs().max() <= 1e-6 for k, v in _weights(tmp_path / "accumulated").items())


def _torchrun(script_args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _train_args(dataset, run_dir, max_steps, *sets):
    sets = [*TINY, f"data.datasets=[{dataset.motion_train_csv}]", "logging.log_every=1", *sets]
    return ["-m", "vjepa_fast.cli", "train", "--run-dir", str(run_dir), "--max-steps", str(max_steps),
            "--no-progress", *[x for o in sets for x in ("--set", o)]]


def test_accumulation_on_two_gloo_processes(tiny_dataset, tmp_path):
    for name, sets in (("big", ["data.batch_size=8"]),
                       ("accumulated", ["data.batch_size=4", "optimization.accumulation_steps=2"])):
        out = _torchrun(_train_args(tiny_dataset, tmp_path / name, 2, *sets))
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    a, b = _losses(tmp_path / "big"), _losses(tmp_path / "accumulated")
    assert a.keys() == {0, 1} and all(abs(a[s] - b[s]) <= 1e-6 for s in a)
    big_w = _weights(tmp_path / "big")
    assert all((v - big_w[k]).abs().max() <= 1e-6 for k, v in _weights(tmp_path / "accumulated").items())


def test_no_usable_checkpoint_stops_every_rank_at_once(tiny_dataset, tmp_path):
    sets = ["logging.checkpoint_every=1", "logging.keep_last=2"]
    train(_cfg(tiny_dataset, *sets), tmp_path / "run", max_steps=2, progress=False)
    for name in ("latest.pt", "step_00000001.pt"):
        _flip_a_byte(tmp_path / "run" / "checkpoints" / name)
    started = time.monotonic()
    out = _torchrun([*_train_args(tiny_dataset, tmp_path / "run", 3, *sets), "--resume"], timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode != 0 and time.monotonic() - started < 120, log[-3000:]  # not after the 30 min timeout
    assert "rank 0 could not resume: no usable checkpoint" in log, log[-3000:]  # rank 1 says why it stops
    assert "did not answer" not in log


# ---- 7. hung ranks ------------------------------------------------------------------------------

HANG = textwrap.dedent("""\
    import os, sys, time
    import vjepa_fast.train as train_module
    real, calls = train_module.train_step, [0]

    def train_step(*args, **kwargs):  # rank 1 stops answering in its step 3 (a dead node, a stuck file system)
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 4:
            time.sleep(3600)
        return real(*args, **kwargs)

    train_module.train_step = train_step
    from vjepa_fast import cli
    sys.exit(cli.main(sys.argv[1:]))
    """)


@pytest.mark.parametrize("message, is_timeout", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 6000ms for recv operation", True),
    ("Application timeout caused pair closure", True),  # the backward's all-reduce, on a connection a timeout closed
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
])
def test_gloo_timeouts_are_recognised_in_either_wording(message, is_timeout):
    assert dist_utils.is_collective_timeout(RuntimeError(message)) is is_timeout
    assert not dist_utils.is_collective_timeout(ValueError(message))


def test_a_rank_that_stops_answering_is_named_within_the_timeout(tiny_dataset, tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    args = _train_args(tiny_dataset, tmp_path / "run", 10, "logging.checkpoint_every=2",
                       "meta.dist_timeout_minutes=0.1")[2:]  # 6 s
    started = time.monotonic()
    out = _torchrun([str(script), *args], timeout=240)
    took = time.monotonic() - started
    log = out.stdout + out.stderr
    assert out.returncode != 0 and took < 120, log[-3000:]
    assert "rank 0 stopped in step 3: rank(s) 1 did not answer for meta.dist_timeout_minutes=0.1" in log, log[-3000:]
    assert "the last checkpoint (step 2)" in log
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    ckpt.verify_checksum(latest)
    assert ckpt.load_training_state(latest).step == 2  # the checkpoint from before the hang is usable
