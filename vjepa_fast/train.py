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

import kernels

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


def mask_generator_for(cfg: Config, step: int) -> torch.Generator:
    """The (CPU) generator of the mask positions of `step`: seeded by (seed, step) so resume replays it."""
    return torch.Generator().manual_seed(cfg.meta.seed * 1_000_003 + step)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when configured; CPU computes in fp32."""
    if device.type == "cuda" and cfg.meta.dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EMA:
    """target = m * target + (1 - m) * encoder after each step: `torch._foreach_lerp_` over the parameter lists,
    or (fused) one Triton launch over flat parameter buffers where the kernels run."""

    def __init__(self, model: VJEPA, fused: bool):
        self.target = list(model.target_encoder.parameters())
        self.source = list(model.encoder.parameters())
        device = self.source[0].device
        self.flat = None
        if fused and (device.type == "cuda" or kernels.runs_on_cpu()):
            self.flat = (kernels.flatten_params(model.target_encoder), kernels.flatten_params(model.encoder))

    @torch.no_grad()
    def __call__(self, momentum: float) -> None:
        if self.flat is not None:
            kernels.ema_(*self.flat, momentum)
        else:
            torch._foreach_lerp_(self.target, self.source, 1.0 - momentum)


class StepLog:
    """Per-step metrics kept on the device and written to metrics.csv in one host synchronisation per flush."""

    def __init__(self, metrics: MetricsLog, batch: int, skipped_inputs):
        self.metrics, self.batch, self.skipped_inputs = metrics, batch, skipped_inputs
        self.rows: list[tuple] = []
        self.since = time.perf_counter()
        self.first_loss = self.last_loss = float("nan")
        self.nonfinite_step: int | None = None  # the first step whose loss was not finite

    def add(self, step, loss, norm_enc, norm_pred, lr, wd, momentum, data_s) -> None:
        self.rows.append((step, torch.stack([loss.float(), norm_enc.float(), norm_pred.float()]), lr, wd, momentum,
                          data_s))

    def flush(self) -> dict | None:
        """Write the pending rows; returns the last one (None if nothing was pending)."""
        if not self.rows:
            return None
        values = torch.stack([r[1] for r in self.rows]).tolist()
        now = time.perf_counter()
        step_s = (now - self.since) / len(self.rows)  # wall time per step over the window (device included)
        skipped = self.skipped_inputs()
        for (step, _, lr, wd, momentum, data_s), (loss, n_enc, n_pred) in zip(self.rows, values):
            row = {"step": step, "loss": loss, "lr": lr, "wd": wd, "momentum": momentum, "grad_norm_encoder": n_enc,
                   "grad_norm_predictor": n_pred, "clips_per_s": self.batch / step_s, "step_s": step_s,
                   "data_s": data_s, "skipped_inputs": skipped}
            self.metrics.write(row)
            if math.isnan(self.first_loss):
                self.first_loss = loss
            self.last_loss = loss
            if not math.isfinite(loss) and self.nonfinite_step is None:
                self.nonfinite_step = step
        self.rows, self.since = [], now
        return row


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
    ema = EMA(model, fused=cfg.meta.path == "fast")  # flattens the parameters: before the optimizer sees them
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

    pending = StepLog(metrics, batch, lambda: sum(loader.stats.values()))
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
            # masks are drawn on the CPU (no device sync for their sizes) while the device works
            masks_enc, masks_pred = masks.gen(batch, step, generator=mask_generator_for(cfg, step))
            masks_enc = [m.to(device, non_blocking=True) for m in masks_enc]
            masks_pred = [m.to(device, non_blocking=True) for m in masks_pred]
            lr, wd = schedule.lr(step + 1), schedule.wd(step + 1)
            apply_schedule(optimizer, lr, wd)

            with autocast_for(cfg, device):
                loss = model.loss(clips, masks_enc, masks_pred, path=cfg.meta.path)
            loss.backward()
            max_norm = cfg.optimization.clip_grad if step >= clip_after else None
            norm_enc = _grad_norm_and_clip(model.encoder, max_norm)
            norm_pred = _grad_norm_and_clip(model.predictor, max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            momentum = schedule.momentum(step)
            ema(momentum)
            pending.add(step, loss.detach(), norm_enc, norm_pred, lr, wd, momentum, t_data)
            step += 1
            bar.update(1)
            if step % cfg.logging.log_every == 0 or step == total:
                last = pending.flush()  # the one host synchronisation every log_every steps
                if pending.nonfinite_step is not None:
                    raise FloatingPointError(f"non-finite loss at step {pending.nonfinite_step}; the last checkpoint "
                                             f"({run.latest}) is intact. Try a lower optimization.lr.")
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                clips_s=f"{last['clips_per_s']:.1f}")
            if step % cfg.logging.checkpoint_every == 0 or step == total:
                pending.flush()
                save(step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: saving %s", step, run.latest)
        pending.flush()
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
             pending.first_loss, pending.last_loss, run.latest)
    return TrainResult(run.root, start, step, pending.first_loss, pending.last_loss, seconds)
