"""The V-JEPA pretraining loop: data -> masks -> loss -> AdamW -> EMA, with a run directory that survives crashes.

Every source of randomness inside the loop (the data stream, the mask positions) is a pure function of
(seed, step), so a run resumed from a checkpoint replays exactly the steps an uninterrupted run takes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config, save_config
from .data import build_train_loader
from .masks import MaskGenerator
from .model import VJEPA
from .optim import Schedule, apply_schedule, build_optimizer
from .run_log import MetricsLog, plot_loss

log = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "loss", "lr", "wd", "momentum", "grad_norm_encoder", "grad_norm_predictor",
                 "clips_per_s", "step_s", "data_s", "skipped_inputs"]


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    end_step: int
    first_loss: float
    last_loss: float
    seconds: float


def pick_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mask_generator_for(cfg: Config, device: torch.device, step: int) -> torch.Generator:
    """The generator of the mask positions of `step`: seeded by (seed, step) so resume replays it."""
    return torch.Generator(device=device).manual_seed(cfg.meta.seed * 1_000_003 + step)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when configured; CPU computes in fp32."""
    if device.type == "cuda" and cfg.meta.dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def ema_update(model: VJEPA, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * encoder, for every parameter."""
    torch._foreach_lerp_(list(model.target_encoder.parameters()), list(model.encoder.parameters()),
                         1.0 - momentum)


def _grad_norm_and_clip(module: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
    return norm


class RunDir:
    """Paths of one training run: config.yaml, metrics.csv, loss.png, train.log, checkpoints/latest.pt."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.csv"
        self.loss_plot = self.root / "loss.png"
        self.log_file = self.root / "train.log"
        self.latest = self.root / "checkpoints" / "latest.pt"


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          device: str | None = None, max_steps: int | None = None, progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir` (default runs/<config name>); `max_steps` stops early (schedules unchanged)."""
    run = RunDir(run_dir or Path("runs") / cfg.name)
    if run.latest.exists() and not (resume or overwrite):
        raise FileExistsError(f"{run.root} already holds a checkpoint ({run.latest}); pass --resume to continue "
                              f"it, --overwrite to start again, or choose another --run-dir")
    if resume and not run.latest.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {run.latest}")
    run.root.mkdir(parents=True, exist_ok=True)
    file_log = logging.FileHandler(run.log_file)
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    try:
        return _train(cfg, run, resume, pick_device(device), max_steps, progress)
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()


def _train(cfg: Config, run: RunDir, resume: bool, device: torch.device, max_steps: int | None,
           progress: bool) -> TrainResult:
    seed_everything(cfg.meta.seed)
    model = VJEPA(cfg).to(device)
    optimizer = build_optimizer(cfg.optimization, model.encoder, model.predictor, fused=device.type == "cuda")
    schedule = Schedule.from_config(cfg.optimization)
    total = min(cfg.total_steps, max_steps) if max_steps else cfg.total_steps

    start = 0
    if resume:
        state = ckpt.load_checkpoint(run.latest, map_location=device)
        model.load_networks(state)
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        start = state["step"]
        log.info("resumed %s at step %d", run.latest, start)
    elif cfg.meta.load_checkpoint and cfg.meta.read_checkpoint:
        source = cfg.meta.read_checkpoint
        state = ckpt.load_checkpoint(source)
        model.load_networks(state if state.get("format") == ckpt.FORMAT else ckpt.import_official(source))
        log.info("initialised the networks from %s", source)
    save_config(cfg, run.config)

    def save(step: int) -> None:
        ckpt.save_checkpoint({"format": ckpt.FORMAT, "version": 1, "step": step, "config": cfg.to_dict(),
                              **{name: getattr(model, name).state_dict() for name in ckpt.NETWORKS},
                              "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()}, run.latest)

    metrics = MetricsLog(run.metrics, METRIC_FIELDS, resume_step=start if resume else None)
    loader = build_train_loader(cfg, start_step=start)
    masks = MaskGenerator(cfg.mask, cfg.data.crop_size, cfg.data.num_frames, cfg.data.patch_size,
                          cfg.data.tubelet_size)
    batch = cfg.data.batch_size
    clip_after = schedule.warmup_steps
    log.info("training %s on %s: steps %d -> %d, batch %d, run dir %s", cfg.name, device, start, total, batch,
             run.root)

    first_loss = last_loss = float("nan")
    t_start = time.perf_counter()
    step = start
    bar = tqdm(total=total, initial=start, disable=not progress, desc=cfg.name, unit="step", dynamic_ncols=True)
    model.train()
    try:
        while step < total:
            t0 = time.perf_counter()
            clips, _labels = next(loader)
            clips = clips.to(device, non_blocking=True)
            t_data = time.perf_counter() - t0
            masks_enc, masks_pred = masks.gen(batch, step, device, mask_generator_for(cfg, device, step))
            lr, wd = schedule.lr(step + 1), schedule.wd(step + 1)
            apply_schedule(optimizer, lr, wd)

            with autocast_for(cfg, device):
                loss = model.loss(clips, masks_enc, masks_pred)
            loss.backward()
            max_norm = cfg.optimization.clip_grad if step >= clip_after else None
            norm_enc = _grad_norm_and_clip(model.encoder, max_norm)
            norm_pred = _grad_norm_and_clip(model.predictor, max_norm)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite loss {loss_value} at step {step}; the last checkpoint "
                                         f"({run.latest}) is intact. Try a lower optimization.lr.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            momentum = schedule.momentum(step)
            ema_update(model, momentum)
            step += 1

            dt = time.perf_counter() - t0
            metrics.write({"step": step - 1, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6e}", "wd": f"{wd:.6f}",
                           "momentum": f"{momentum:.6f}", "grad_norm_encoder": f"{norm_enc.item():.6g}",
                           "grad_norm_predictor": f"{norm_pred.item():.6g}", "clips_per_s": f"{batch / dt:.2f}",
                           "step_s": f"{dt:.4f}", "data_s": f"{t_data:.4f}",
                           "skipped_inputs": sum(loader.stats.values())})
            if math.isnan(first_loss):
                first_loss = loss_value
            last_loss = loss_value
            bar.update(1)
            if step % cfg.logging.log_every == 0 or step == total:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", clips_s=f"{batch / dt:.1f}")
            if step % cfg.logging.checkpoint_every == 0 or step == total:
                save(step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: saving %s", step, run.latest)
        save(step)
        raise
    finally:
        bar.close()
        loader.close()
        metrics.close()
        if run.metrics.exists():
            plot_loss(run.metrics, run.loss_plot, title=f"{cfg.name}: V-JEPA loss")
    seconds = time.perf_counter() - t_start
    log.info("done: steps %d -> %d in %.1f s, loss %.4f -> %.4f; checkpoint %s", start, step, seconds,
             first_loss, last_loss, run.latest)
    return TrainResult(run.root, start, step, first_loss, last_loss, seconds)
