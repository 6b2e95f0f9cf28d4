"""torch.distributed for training: process-group set-up from torchrun's environment, DDP wrapping, reductions.

Launch with torchrun (env://); a plain `python`/`vjepa-fast` start is one process. NCCL on CUDA, gloo on CPU.
The global batch is data.batch_size x world size; the schedules count optimiser steps, so ipe (iterations per
"epoch") and the lr need no change when the number of GPUs changes for the same global batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this process's env and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=timedelta(minutes=30))
    return env, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over one network; gradients are averaged across ranks during the backward."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def mean_across_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean over ranks of a tensor of metrics (for logging; a no-op on one process)."""
    if not env.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


@torch.no_grad()
def assert_replicas_equal(modules: dict[str, torch.nn.Module], env: DistEnv) -> None:
    """Raise if the parameters of these (replicated) networks differ across ranks: a cheap fingerprint (sum and
    sum of squares in fp64) per network, gathered from every rank. A no-op on one process."""
    if not env.enabled:
        return
    device = next(iter(modules.values())).parameters().__next__().device
    local = torch.stack([torch.stack([sum(p.double().sum() for p in m.parameters()),
                                      sum(p.double().pow(2).sum() for p in m.parameters())])
                         for m in modules.values()]).to(device)
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            bad = [name for name, a, b in zip(modules, other, gathered[0]) if not torch.equal(a, b)]
            raise RuntimeError(f"the replicas diverged: rank {rank}'s {', '.join(bad)} differ from rank 0's "
                               f"(non-deterministic kernels, or a rank that skipped a step alone)")
