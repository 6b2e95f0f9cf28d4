"""One V-JEPA training step and what it needs: the device, seeding, autocast, the batch's masks on the device, the
EMA of the target encoder, and `train_step` (loss, backward, clipped AdamW, EMA).

Nothing here waits for the device: host data reaches it through pinned memory with non-blocking copies, the EMA
momentum and the skip of a non-finite step stay on the device, and the step returns device tensors. The training
loop (train.py) and the step benchmark both run this module's step, so what the benchmark times is what trains.
"""
from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, Sequence

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from . import kernels
from .config import Config
from .distributed import gradient_sync_off, local_tensor, local_value, sync_sometimes_used
from .errors import UserError
from .kernels import to_device
from .masks import MaskGenerator
from .model import VJEPA


def pick_device(name: str | None = None) -> torch.device:
    """`auto`/None: CUDA when present, else the CPU; otherwise the named device (which must exist)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 on CUDA when configured; a CPU computes in fp32."""
    return torch.bfloat16 if device.type == "cuda" and cfg.meta.dtype == "bfloat16" else torch.float32


def autocast_for(cfg: Config, device: torch.device):
    """Autocast to compute_dtype where that is not fp32."""
    dtype = compute_dtype(cfg, device)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def move_to(x, device: torch.device):
    """A tensor, or (nested) lists of them (clips of several lengths, masks), on `device` without a host wait."""
    return to_device(x, device) if isinstance(x, torch.Tensor) else [move_to(y, device) for y in x]


def build_model(cfg: Config, device: torch.device) -> VJEPA:
    """The seeded networks of `cfg`, built on `device` itself (a ViT-H built on a CPU and copied takes ~30 s)."""
    seed_everything(cfg.meta.seed)
    with torch.device(device):
        model = VJEPA(cfg)
    return model.to(device)  # moves the fixed position tables, computed on the CPU (bit-identical on every device)


def masks_generators(cfg: Config) -> dict[int, MaskGenerator]:
    """One mask generator per clip length of the run (V-JEPA 2's data.dataset_fpcs), keyed by frames."""
    d = cfg.data
    return {frames: MaskGenerator(cfg.mask, d.crop_size, frames, d.patch_size, d.tubelet_size)
            for frames in dict.fromkeys(d.dataset_fpcs or [d.num_frames])}


def draw_masks(masks: MaskGenerator, cfg: Config, step: int, device: torch.device, batch_size: int, stream: int = 0):
    """The context and prediction masks of `step` for `batch_size` clips, drawn on the
    CPU from a generator seeded by (seed, step, stream) (so a resumed run replays them), then sent to `device`
    without a host wait. `stream` tells apart the draws of one step (clip-length groups, micro-batches)."""
    seed = cfg.meta.seed * 1_000_003 + step
    if stream:
        seed = int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)
    masks_enc, masks_pred = masks.gen(batch_size, step,
                                      generator=torch.Generator().manual_seed(seed))
    return [to_device(m, device) for m in masks_enc], [to_device(m, device) for m in masks_pred]


class Batch(NamedTuple):
    """The clips of one (micro-)batch and their masks, as VJEPA.loss takes them: a clip tensor and a list of masks
    per mask config, or (several clip lengths) a list of clip tensors and a list of mask lists, one per length."""
    clips: torch.Tensor | list[torch.Tensor]
    masks_enc: list
    masks_pred: list


def step_batches(clips: Sequence, masks: dict[int, MaskGenerator], cfg: Config, step: int,
                 device: torch.device) -> list[Batch]:
    """The micro-batches of step `step` with their masks. `clips`: one entry per micro-batch, a clip tensor or a list
    of them (one per clip length). One clip length: the masks are drawn once for all the step's clips and cut into
    each micro-batch's rows (the whole step's masks, cut to its shortest sample, so the micro-batches add up to one
    larger batch exactly). Several lengths: drawn per micro-batch and length."""
    if isinstance(clips[0], torch.Tensor):
        masks_enc, masks_pred = draw_masks(masks[clips[0].size(2)], cfg, step, device,
                                           sum(c.size(0) for c in clips))
        rows = [0, *itertools.accumulate(c.size(0) for c in clips)]
        return [Batch(c, [m[a:b] for m in masks_enc], [m[a:b] for m in masks_pred])
                for c, a, b in zip(clips, rows, rows[1:])]
    lengths = list(masks)
    batches = []
    for micro, groups in enumerate(clips):
        drawn = [draw_masks(masks[c.size(2)], cfg, step, device, c.size(0),
                            stream=1 + micro * len(lengths) + lengths.index(c.size(2))) for c in groups]
        batches.append(Batch(list(groups), [e for e, _ in drawn], [p for _, p in drawn]))
    return batches


class EMA:
    """target = m * target + (1 - m) * encoder after each step: one Triton launch over flat parameter buffers
    (fused, where the kernels run), or a `torch._foreach_lerp_` over the (local shards of the) parameters."""

    def __init__(self, model: VJEPA, fused: bool):
        self.target = list(model.target_encoder.parameters())
        self.source = list(model.encoder.parameters())
        device = self.source[0].device
        self.flat = None
        if fused and kernels.runs_on(device):
            self.flat = (kernels.flatten_params(model.target_encoder), kernels.flatten_params(model.encoder))

    @torch.no_grad()
    def __call__(self, momentum: torch.Tensor) -> None:
        """momentum: a 0-d device tensor, which no branch reads on the host."""
        if self.flat is not None:
            kernels.ema_(*self.flat, momentum)
            return
        target = [local_tensor(p) for p in self.target]  # FSDP: the matching local shards
        source = [local_tensor(p) for p in self.source]
        # A tensor weight takes the List overload: the Scalar one would read it back to the host every step.
        weights = {dtype: (1.0 - momentum).to(dtype) for dtype in {t.dtype for t in target}}
        torch._foreach_lerp_(target, source, [weights[t.dtype] for t in target])


def _grad_norm_and_clip(module: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """The gradients' total norm, clipping them to `max_norm` when set. FSDP: the sharded gradients' norm (over all
    shards, replicated) and that of the parameters FSDP leaves whole (the same on every rank) together; the clip
    of the sharded ones by that plain norm needs train_step's implicit_replication."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    parts = [part for part in ([g for g in grads if isinstance(g, DTensor)],
                               [g for g in grads if not isinstance(g, DTensor)]) if part] or [[]]
    norms = [local_value(torch.nn.utils.get_total_norm(part)) for part in parts]
    norm = norms[0] if len(norms) == 1 else torch.nn.utils.get_total_norm(norms)
    if max_norm is not None:
        for part in parts:
            torch.nn.utils.clip_grads_with_norm_(part, max_norm, norm)
    return norm


@dataclass
class StepResult:
    """Device tensors of one step: no host synchronisation was needed to make them."""
    loss: torch.Tensor
    norm_encoder: torch.Tensor
    norm_predictor: torch.Tensor
    finite: torch.Tensor  # False: the update was skipped (non-finite loss or gradient)
    targets: torch.Tensor | None = None  # the target encoder's features [B, N, D], when asked for


def train_step(model: VJEPA, optimizer: torch.optim.Optimizer, ema: EMA, batches: Sequence[Batch], *,
               computation: str, autocast, max_norm: float | None, momentum: float,
               stage: Callable[[str], ContextManager] | None = None, keep_targets: bool = False) -> StepResult:
    """One optimisation step over `batches` (one, or the micro-batches of gradient accumulation: their gradients
    add up, all-reduced across ranks once, after the last): loss, backward, per-module gradient norms (clipped when
    `max_norm` is set), AdamW, EMA; a non-finite loss or gradient skips the update on the device. `optimizer` must
    be a fused AdamW (also over FSDP's sharded parameters: the gradient norms, hence the skip, are then global, the
    same on every rank). `stage(name)` wraps each part (STAGES of the loss, then "backward", "optimizer", "ema")
    for timing; `keep_targets` returns the target features the first batch's loss used (for the health monitor)."""
    stage = stage or (lambda name: contextlib.nullcontext())
    loss, targets = 0.0, None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        keep = keep_targets and i == 0  # kept alive through the backward only when asked
        with contextlib.nullcontext() if last else gradient_sync_off(model.encoder, model.predictor):
            with autocast:
                out = model.loss(*batch, computation=computation, stage=stage, return_targets=keep)
            micro, targets = out if keep else (out, targets)
            with stage("backward"):
                (micro / len(batches)).backward()
        loss = loss + micro.detach() / len(batches)
    with stage("optimizer"), implicit_replication():  # FSDP: the parameters it leaves whole act as replicated
        sync_sometimes_used(model.encoder, model.predictor)  # V-JEPA 2's mask tokens of absent clip lengths
        norm_enc = _grad_norm_and_clip(model.encoder, max_norm)
        norm_pred = _grad_norm_and_clip(model.predictor, max_norm)
        finite = torch.isfinite(loss) & torch.isfinite(norm_enc) & torch.isfinite(norm_pred)
        optimizer.found_inf = (~finite).float()  # the fused AdamW skips its whole update (state included)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with stage("ema"):
        # momentum 1 leaves the target encoder as it was; fp64 as the schedule computed it, made on the device
        ema(torch.where(finite, torch.full((), momentum, dtype=torch.float64, device=finite.device), 1.0))
    return StepResult(loss, norm_enc, norm_pred, finite, targets)
