"""AdamW with the official two weight-decay groups, and the official lr / weight-decay / EMA schedules.

Every schedule runs over `ipe_scale * epochs * ipe` steps, so with ipe_scale > 1 its tail is never reached. The lr
warms up linearly then follows a cosine (V-JEPA 2's pretraining sets final_lr = lr: a constant), or, in a V-JEPA 2
cooldown (optimization.is_anneal), decays linearly from lr towards final_lr with no warmup. The schedules are pure
functions of the step, so a resumed run recomputes them exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import OptimizationConfig
from .errors import UserError


def param_groups(*modules: nn.Module) -> list[dict]:
    """A group per module of its weights with decay, then a group per module of its biases and 1-D parameters
    without (`WD_exclude`). As the official code, frozen parameters (the fixed position embeddings) stay in the
    groups (they never get a gradient, so AdamW skips them), which keeps optimizer states interchangeable with
    official checkpoints."""
    decay, no_decay = [], []
    for module in modules:
        decay.append([p for n, p in module.named_parameters() if "bias" not in n and p.dim() != 1])
        no_decay.append([p for n, p in module.named_parameters() if "bias" in n or p.dim() == 1])
    return ([{"params": ps} for ps in decay]
            + [{"params": ps, "WD_exclude": True, "weight_decay": 0.0} for ps in no_decay])


def build_optimizer(opt: OptimizationConfig, *modules: nn.Module, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over `modules`; fused (CPU and CUDA), which also lets a training step skip itself on the device."""
    return torch.optim.AdamW(param_groups(*modules), lr=opt.start_lr, betas=opt.betas, eps=opt.eps,
                             weight_decay=opt.weight_decay, fused=fused or None)


# How torch runs AdamW, not what it computes, as the official code leaves it (torch.optim.AdamW's defaults). Ours
# (fused, which the training step needs to skip itself on the device) stay when a checkpoint's state is loaded.
OFFICIAL_IMPLEMENTATION = {"foreach": None, "capturable": False, "differentiable": False, "fused": None}


def adapt_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: str) -> dict:
    """A checkpoint's optimizer state (ours, or an official `opt`: the same param groups in the same order) made
    for loading into `optimizer`: its moments and step counts, and its groups' hyperparameters (betas, eps,
    WD_exclude, ...) as the official loader takes them, but this optimizer's OFFICIAL_IMPLEMENTATION keys. Raises
    UserError naming `source` when the groups or the moments' shapes do not fit this optimizer's parameters."""
    groups = state["param_groups"]
    sizes, ours = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
    if sizes != ours:
        raise UserError(f"{source}: its optimizer state has parameter groups of {sizes} parameters, this model's "
                        f"optimizer {ours}: a checkpoint of another architecture")
    params = {i: p for saved, group in zip(groups, optimizer.param_groups)
              for i, p in zip(saved["params"], group["params"])}
    for i, moments in state["state"].items():
        bad = [k for k, v in moments.items() if k != "step" and v.shape != params[i].shape]
        if bad:
            raise UserError(f"{source}: optimizer state {i} ({bad[0]}) has shape {tuple(moments[bad[0]].shape)}, "
                            f"its parameter {tuple(params[i].shape)}: a checkpoint of another architecture")
    adapted = [{**saved, **{k: group[k] for k in OFFICIAL_IMPLEMENTATION if k in group}}
               for saved, group in zip(groups, optimizer.param_groups)]
    return {**state, "param_groups": adapted}


@dataclass(frozen=True)
class Schedule:
    """lr(s) and wd(s) take the 1-based step s (the official schedulers step before each iteration);
    momentum(i) takes the 0-based iteration i (the official generator yields its first value first)."""

    start_lr: float
    ref_lr: float
    final_lr: float
    warmup_steps: int
    ref_wd: float
    final_wd: float
    ema_start: float
    ema_end: float
    total: int  # schedule length: ipe_scale * epochs * ipe
    linear_decay: bool = False  # the cooldown's lr

    @classmethod
    def from_config(cls, opt: OptimizationConfig) -> "Schedule":
        return cls(start_lr=opt.start_lr, ref_lr=opt.lr, final_lr=opt.final_lr,
                   warmup_steps=int(opt.warmup * opt.ipe), ref_wd=opt.weight_decay,
                   final_wd=opt.final_weight_decay, ema_start=opt.ema[0], ema_end=opt.ema[1],
                   total=int(opt.ipe_scale * opt.epochs * opt.ipe), linear_decay=opt.is_anneal)

    def lr(self, s: int) -> float:
        if self.linear_decay:  # V-JEPA 2's LinearDecaySchedule: no warmup, no clamp
            return self.ref_lr + s / max(1, self.total) * (self.final_lr - self.ref_lr)
        if s < self.warmup_steps:
            return self.start_lr + s / max(1, self.warmup_steps) * (self.ref_lr - self.start_lr)
        progress = (s - self.warmup_steps) / max(1, self.total - self.warmup_steps)
        cosine = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine)

    def wd(self, s: int) -> float:
        progress = s / self.total
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)

    def momentum(self, i: int) -> float:
        return self.ema_start + i * (self.ema_end - self.ema_start) / self.total


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("WD_exclude", False):
            group["weight_decay"] = wd
