"""What only runs on CUDA: the CUDA RNG state in checkpoints, resuming a CUDA run, NCCL data parallelism (DDP and
FSDP2), evaluation on the device. GPU tests (marked `gpu`: bench/gpu_check.sh runs them); the RNG round trip also
on the CPU, with a stand-in for the CUDA generator."""
import csv
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from helpers import TINY, save_networks, tiny_config
from vjepa_fast import checkpoint as ckpt
from vjepa_fast import cli
from vjepa_fast.distributed import DistEnv
from vjepa_fast.eval.features import cached_features
from vjepa_fast.eval.run import dataset_file_split, load_frozen
from vjepa_fast.eval.views import ViewSpec
from vjepa_fast.model import NETWORKS, VJEPA
from vjepa_fast.train import train


def _save_with_rng(path):
    """A tiny model's training checkpoint holding rng_state() as training saves it."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = VJEPA(cfg)
    networks = {name: getattr(model, name).state_dict() for name in NETWORKS}
    return ckpt.save_training_state(ckpt.TrainingState(3, cfg.to_dict(), networks, optimizer={},
                                                       rng=ckpt.rng_state(), health={}, skipped_steps=0), path)


class FakeCudaRng:
    """Stands in for torch.cuda's generators on a machine without CUDA: one byte state per device."""

    def __init__(self, devices=2):
        self.states = [torch.randint(0, 255, (16,), dtype=torch.uint8) for _ in range(devices)]

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states):
        self.states = [s.clone() for s in states]


def test_checkpoint_round_trips_the_cuda_rng_state(tmp_path, monkeypatch):
    fake = FakeCudaRng()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", fake.get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fake.set_rng_state_all)
    saved = fake.get_rng_state_all()
    path = _save_with_rng(tmp_path / "latest.pt")
    expected = (torch.rand(4), np.random.rand(4), random.random())
    fake.set_rng_state_all([torch.zeros(16, dtype=torch.uint8)] * 2)  # the generators move on after the save
    torch.rand(10), np.random.rand(10), random.random()

    state = ckpt.load_training_state(path)
    assert [torch.equal(a, b) for a, b in zip(state.rng["cuda"], saved)] == [True, True]
    ckpt.set_rng_state(state.rng)
    assert all(torch.equal(a, b) for a, b in zip(fake.states, saved))
    again = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


@pytest.mark.gpu
def test_cuda_rng_state_survives_save_and_load(tmp_path):
    torch.cuda.manual_seed_all(3)
    torch.randn(100, device="cuda")  # a generator that has moved
    path = _save_with_rng(tmp_path / "latest.pt")
    expected = torch.randn(1000, device="cuda")
    torch.randn(77, device="cuda")
    ckpt.set_rng_state(ckpt.load_training_state(path).rng)
    assert torch.equal(torch.randn(1000, device="cuda"), expected)


def _cfg(dataset, *extra):
    return tiny_config(f"data.datasets=[{dataset.motion_train_csv}]", "logging.checkpoint_every=2",
                       "logging.log_every=1", *extra)


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.mark.gpu
def test_resume_on_cuda_restores_the_state_and_continues(tiny_dataset, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dataset)
    full = train(cfg, tmp_path / "full", max_steps=4, device="cuda", progress=False)
    train(cfg, tmp_path / "split", max_steps=2, device="cuda", progress=False)
    saved = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt")
    assert saved["step"] == 2 and len(saved["rng"]["cuda"]) == torch.cuda.device_count()
    restored = []
    set_rng = ckpt.set_rng_state
    monkeypatch.setattr(ckpt, "set_rng_state",
                        lambda state: (set_rng(state), restored.append(torch.cuda.get_rng_state_all())))
    resumed = train(cfg, tmp_path / "split", max_steps=4, resume=True, device="cuda", progress=False)
    assert resumed.start_step == 2 and resumed.end_step == 4 == full.end_step and resumed.skipped_steps == 0
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], saved["rng"]["cuda"]))
    split, straight = _losses(tmp_path / "split"), _losses(tmp_path / "full")
    assert [s for s, _ in split] == [s for s, _ in straight] == [0, 1, 2, 3]
    # the same masks, clips and weights; bf16 kernels may reduce in another order run to run
    assert [loss for _, loss in split] == pytest.approx([loss for _, loss in straight], rel=1e-2)
    last = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt")
    assert last["step"] == 4 and all(v.device.type == "cpu" for v in last["encoder"].values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_nccl_group(monkeypatch):
    """A 1-process NCCL group, with DistEnv reporting data parallelism on: training then wraps DDP / FSDP2 and
    runs every collective through NCCL, as each rank of a multi-GPU run does."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    monkeypatch.setattr(DistEnv, "enabled", property(lambda self: True))
    yield
    dist.destroy_process_group()


def _torchrun_on_gpus(run_dir, dataset, max_steps, sets, resume=False):
    sets = [*TINY, f"data.datasets=[{dataset.motion_train_csv}]", "logging.log_every=1",
            "logging.checkpoint_every=2", *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vjepa_fast.cli", "train", "--run-dir", str(run_dir), "--max-steps", str(max_steps), "--no-progress",
           "--device", "cuda", *(["--resume"] if resume else []), *[x for o in sets for x in ("--set", o)]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "cuda:0 x 2" in (run_dir / "train.log").read_text()  # two ranks, each on its own GPU


@pytest.mark.gpu
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_data_parallel_training_checkpoints_and_resumes(tiny_dataset, tmp_path, request, parallel):
    """Two ranks under torchrun where there are two GPUs, else one rank in a 1-process NCCL group."""
    sets = [f"meta.data_parallel={parallel}"]
    if torch.cuda.device_count() >= 2:
        _torchrun_on_gpus(tmp_path / "split", tiny_dataset, 2, sets)
        _torchrun_on_gpus(tmp_path / "split", tiny_dataset, 4, sets, resume=True)
    else:
        request.getfixturevalue("one_process_nccl_group")
        cfg = _cfg(tiny_dataset, *sets)
        assert train(cfg, tmp_path / "split", max_steps=2, device="cuda", progress=False).end_step == 2
        resumed = train(cfg, tmp_path / "split", max_steps=4, resume=True, device="cuda", progress=False)
        assert resumed.start_step == 2 and resumed.skipped_steps == 0
    losses = _losses(tmp_path / "split")
    assert [s for s, _ in losses] == [0, 1, 2, 3] and all(0 < loss < 10 for _, loss in losses)
    state = ckpt.load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt")
    assert state["step"] == 4
    for net in NETWORKS:  # full, plain tensors on the CPU: no DDP prefix, no FSDP shards
        assert not any(k.startswith("module.") for k in state[net])
        assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state[net].values())
    assert state["encoder"].keys() == state["target_encoder"].keys()


@pytest.mark.gpu
def test_eval_on_cuda_matches_the_cpu_features_and_trains_probes(tiny_dataset, tmp_path, capsys):
    cfg = tiny_config()
    torch.manual_seed(0)
    path = save_networks(VJEPA(cfg), cfg, tmp_path / "run" / "checkpoints" / "latest.pt", step=7)
    frozen = load_frozen(str(path))
    val = dataset_file_split(tiny_dataset.motion_val_csv)
    spec = ViewSpec(num_frames=cfg.data.num_frames, sampling_rate=frozen.sampling_rate, crop_size=cfg.data.crop_size)
    features = {device: cached_features(frozen.encoder, val.paths, val.labels, spec, device=device, num_workers=0,
                                        cache_dir=str(tmp_path / device), progress=False)
                for device in ("cpu", "cuda")}
    cpu, cuda = (torch.from_numpy(np.asarray(features[d].tokens, dtype=np.float32)) for d in ("cpu", "cuda"))
    assert cpu.shape == cuda.shape and cpu.abs().max() > 0
    assert (cuda - cpu).norm() / cpu.norm() < 1e-2  # float16 autocast on the device, fp32 on the CPU

    args = ["eval", "--checkpoint", str(path), "--probe", "both", "--train", tiny_dataset.motion_train_csv,
            "--val", tiny_dataset.motion_val_csv, "--epochs", "2", "--batch-size", "4", "--device", "cuda",
            "--workers", "0", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "out")]
    assert cli.main(args) == 0
    assert "attentive" in capsys.readouterr().out
    for probe in ("attentive", "linear"):
        with open(tmp_path / "out" / f"{probe}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["epoch"] for r in rows] == ["1", "2"] and all(0 <= float(r["val_top1"]) <= 100 for r in rows)
