"""torch.distributed for training: process-group set-up from torchrun's environment, DDP or FSDP2 wrapping,
full (unsharded) state dicts of FSDP networks and their optimizer, reductions.

Launch with torchrun (env://); a plain `python`/`vjepa-fast` start is one process. NCCL on CUDA, gloo on CPU.
The global batch is data.batch_size x world size; the schedules count optimiser steps, so ipe (iterations per
"epoch") and the lr need no change when the number of GPUs changes for the same global batch.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.parallel import DistributedDataParallel

FULL_ON_RANK0_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered; rank 0 keeps it on CPU


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


def init_distributed(device: torch.device, timeout_minutes: float = 30.0) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns this process's env and device. A
    collective that waits longer than `timeout_minutes` for another rank fails (see unanswering_ranks)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=timedelta(minutes=timeout_minutes))
    return env, device


_TIMEOUT_MESSAGES = ("timed out", "timeout caused pair closure")  # gloo's two ways of saying it


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` is a collective that gave up waiting for another rank. Gloo says "Timed out waiting ..." in the
    collective that waited, or "Application timeout caused pair closure" where the timeout closed a connection that a
    backward's all-reduce was still using."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _TIMEOUT_MESSAGES)


def unanswering_ranks(env: DistEnv, grace_s: float = 3.0) -> list[int] | None:
    """After a collective timed out here: the ranks that did not time out too within `grace_s` (every rank still
    alive and waiting on the same collective does), which are the ones that stopped answering. Through the process
    group's key-value store; None when it cannot be reached."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"vjepa_fast/timed_out/{env.rank}", "1")
        time.sleep(grace_s)
        return [r for r in range(env.world_size) if not store.check([f"vjepa_fast/timed_out/{r}"])]
    except Exception:
        return None


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def from_main(env: DistEnv, value):
    """Rank 0's `value` (any picklable) on every rank; the others wait for rank 0 to send it."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device, *, sometimes_used: Sequence[str] = (),
             never_used: Sequence[str] = ()) -> DistributedDataParallel:
    """DDP over one network; gradients are averaged across ranks during the backward. Parameters that only some
    steps or ranks use (`sometimes_used`, averaged by sync_sometimes_used after the backward) and that none uses
    (`never_used`: they keep no gradient) stay out of DDP's buckets, so DDP needs no find_unused_parameters walk
    of the autograd graph every step."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, [*sometimes_used, *never_used])
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    _mark_sometimes_used(ddp, module, sometimes_used)
    return ddp


def wrap_fsdp(module: nn.Module, block_type: type[nn.Module], block_methods: tuple[str, ...] = (), *,
              forward_only: bool = False, sometimes_used: Sequence[str] = (), never_used: Sequence[str] = ()
              ) -> nn.Module:
    """FSDP2 over one network, in place: every `block_type` submodule is its own shard unit (gathered just before
    it runs, freed after), then the root holds the remaining parameters. `block_methods` name block entry points
    besides forward() (the fast path's forward_packed) that must gather the block's parameters as well.
    The root keeps its gathered parameters from its forward to its backward, unless the network is
    `forward_only` (the EMA target encoder): then it frees them after its forward, so the next forward gathers the
    shards the EMA updated. `sometimes_used` / `never_used` parameters stay whole on every rank, outside FSDP (its
    reduce-scatter covers only parameters with a gradient, so ranks that used different ones would not match), and
    are averaged as under DDP (wrap_ddp)."""
    for block in [m for m in module.modules() if isinstance(m, block_type)]:
        fully_shard(block)
        for name in block_methods:
            register_fsdp_forward_method(block, name)
    named = dict(module.named_parameters())
    fully_shard(module, reshard_after_forward=True if forward_only else None,
                ignored_params={named[n] for n in [*sometimes_used, *never_used]})
    _mark_sometimes_used(module, module, sometimes_used)
    return module


def _mark_sometimes_used(wrapped: nn.Module, module: nn.Module, names: Sequence[str]) -> None:
    """Tell sync_sometimes_used which parameters of `module` (wrapped as `wrapped`) it averages."""
    named = dict(module.named_parameters())
    wrapped.sometimes_used = [named[name] for name in names]


@torch.no_grad()
def sync_sometimes_used(*modules: nn.Module) -> None:
    """Average across ranks the gradients of the DDP / FSDP networks' `sometimes_used` parameters as DDP's
    find_unused_parameters does: the mean over ranks, a rank that did not use one adding zeros, and no gradient
    at all (None: AdamW then leaves the parameter, its state and its weight decay alone) where no rank used it.
    One all-reduce of those gradients with a use count per parameter, and a host read of the counts."""
    params = [p for m in modules for p in getattr(m, "sometimes_used", ())]
    if not params:
        return
    ref = params[0]
    used = torch.tensor([float(p.grad is not None) for p in params], device=ref.device, dtype=ref.dtype)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] + [used])
    flat.div_(dist.get_world_size())  # as DDP: divided before the sum
    dist.all_reduce(flat)
    grads = flat[:-len(params)].split([p.numel() for p in params])
    for p, grad, anyone in zip(params, grads, flat[-len(params):].tolist()):
        p.grad = grad.view_as(p) if anyone > 0 else None


@contextlib.contextmanager
def gradient_sync_off(*modules: nn.Module):
    """Inside: backward passes of these DDP / FSDP2 networks keep their gradients local (the inner micro-batches
    of gradient accumulation); the next backward outside all-reduces the sum. Plain networks: nothing to do."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            if isinstance(m, DistributedDataParallel):
                stack.enter_context(m.no_sync())
            elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
                m.set_requires_gradient_sync(False)
                stack.callback(m.set_requires_gradient_sync, True)
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP parameter), which in-place updates write through; others unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a replicated DTensor's value (a reduction over FSDP gradients, say); others unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_model_state(module: nn.Module) -> dict:
    """The unsharded state dict of an FSDP network (a collective: every rank calls it), on CPU on rank 0 and
    empty elsewhere; the same keys and tensors as the plain network's state_dict()."""
    return get_model_state_dict(module, options=FULL_ON_RANK0_CPU)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names (within `model`) of the optimizer's parameters, in the order optimizer.state_dict() numbers them."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state of FSDP networks (a collective), in optimizer.state_dict()'s layout
    (parameters numbered in group order) so checkpoints match DDP and single-process ones; on CPU on rank 0 and
    empty elsewhere. `model` holds every parameter of `optimizer`."""
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0_CPU)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {"state": {index[name]: s for name, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer.state_dict()-layout state (every rank holds all of it) into the optimizer of FSDP
    networks: each rank keeps its shards. As optimizer.load_state_dict: the groups' settings exactly as given
    (torch's loader turns tuples into lists), and parameters without state there (never updated: V-JEPA 2's unused
    mask tokens) keep none (torch's loader first gives every parameter one)."""
    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    with implicit_replication():  # the parameters FSDP leaves whole (wrap_fsdp) step as replicated DTensors
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True,
                                                                                     strict=False))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, param in enumerate(params):
        if i not in state["state"]:
            optimizer.state.pop(param, None)


def mean_across_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean over ranks of a tensor of metrics (for logging; a no-op on one process)."""
    if not env.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


@torch.no_grad()
def assert_replicas_equal(modules: dict[str, torch.nn.Module], env: DistEnv) -> None:
    """Raise if the parameters of these (replicated: DDP) networks differ across ranks: a cheap fingerprint (sum and
    sum of squares in fp64) per network, gathered from every rank. A no-op on one process; not for FSDP networks,
    whose shards each live on one rank only."""
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
