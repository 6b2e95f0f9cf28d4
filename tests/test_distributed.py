"""Data-parallel training with torchrun on CPU (2 gloo processes): runs, checkpoints, resumes, replicas stay equal."""
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import TINY
from vjepa_fast.checkpoint import load_checkpoint
from vjepa_fast.distributed import DistEnv, assert_replicas_equal


def _torchrun(run_dir, dataset, max_steps, *, resume=False):
    sets = [*TINY, f"data.datasets=[{dataset.motion_train_csv}]", "logging.log_every=1",
            "logging.checkpoint_every=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vjepa_fast.cli", "train", "--run-dir", str(run_dir), "--max-steps", str(max_steps), "--no-progress",
           *(["--resume"] if resume else []), *[x for o in sets for x in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    with open(run_dir / "metrics.csv") as f:
        return [row for row in csv.DictReader(f)]


def test_two_process_training_checkpoints_and_resumes_exactly(tiny_dataset, tmp_path):
    straight = _torchrun(tmp_path / "straight", tiny_dataset, 4)
    _torchrun(tmp_path / "split", tiny_dataset, 2)
    resumed = _torchrun(tmp_path / "split", tiny_dataset, 4, resume=True)
    assert [r["step"] for r in straight] == ["0", "1", "2", "3"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # gloo's 2-rank reduction is exact
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt")
    for net in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(v, b[net][k]) for k, v in a[net].items())
    assert not any(k.startswith("module.") for k in a["encoder"])  # saved without the DDP wrapper


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_worker(rank, port, perturb, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 4)
        if perturb and rank == 1:
            with torch.no_grad():
                net.weight[0, 0] += 1e-6
        try:
            assert_replicas_equal({"encoder": net}, DistEnv(rank, 2, rank))
            results[rank] = "equal"
        except RuntimeError as e:
            results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_replica_check_catches_a_diverged_rank(perturb):
    results = mp.Manager().dict()
    mp.spawn(_replica_worker, args=(_free_port(), perturb, results), nprocs=2)
    if perturb:
        assert all("rank 1's encoder differ" in results[r] for r in (0, 1))
    else:
        assert dict(results) == {0: "equal", 1: "equal"}
