"""The V-JEPA pretraining run: the loop around step.train_step, the run directory, metrics, checkpoints, signals.

Every source of randomness inside the loop (the data stream, the mask positions) is a pure function of
(seed, step), so a run resumed from a checkpoint replays exactly the steps an uninterrupted run takes. A step with
a non-finite loss or gradient is skipped on the device (weights, optimizer state and EMA untouched); SIGTERM saves
a checkpoint and stops cleanly; under torchrun every rank trains its shard and rank 0 writes the run directory.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import Config, resolve_ipe, save_config
from .dali_pipelines import SKIP_REASONS
from .data import build_train_loader, dataset_paths, steps_per_pass
from .errors import RunStopped, UserError
from .health import HealthMonitor, spreads
from .model import NETWORKS, VJEPA
from .models.vit import Block
from .optim import Schedule, adapt_optimizer_state, apply_schedule, build_optimizer
from .run_log import MetricsLog, plot_loss
from .step import (EMA, StepResult, autocast_for, build_model, masks_generators, move_to, pick_device,
                   step_batches, train_step)

log = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "loss", "lr", "wd", "momentum", "grad_norm_encoder", "grad_norm_predictor",
                 "clips_per_s", "step_s", "data_s", "skipped_step", "skipped_steps_total",
                 "health_token_spread", "health_clip_spread", "health_token_spread_ratio", "skipped_inputs",
                 *(f"skipped_{reason}" for reason in SKIP_REASONS)]


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    end_step: int
    first_loss: float
    last_loss: float
    seconds: float
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    stopped_by: str | None = None  # "SIGTERM" when preempted (a checkpoint was saved)


class StepLog:
    """Per-step metrics kept on the device and written to metrics.csv in one host synchronisation per flush
    (averaged over ranks; rank 0 writes), where the health monitor also records the spreads measured since.
    Counts steps skipped for non-finite numbers, in a row and in total."""

    def __init__(self, metrics: MetricsLog | None, batch: int, skipped_inputs, env: dist_utils.DistEnv,
                 health: HealthMonitor, skipped_total: int = 0):
        self.metrics, self.batch, self.skipped_inputs, self.env = metrics, batch, skipped_inputs, env
        self.health = health
        self.rows: list[tuple] = []
        self.since = time.perf_counter()
        self.first_loss = self.last_loss = float("nan")
        self.skipped_total, self.skipped_in_a_row, self.last_skipped = skipped_total, 0, None

    def add(self, step: int, result: StepResult, lr: float, wd: float, momentum: float, data_s: float) -> None:
        """Keep step `step`'s numbers (with the target features' spreads when it kept its targets)."""
        values = [result.loss.float(), result.norm_encoder.float(), result.norm_predictor.float(),
                  (~result.finite).float()]
        if result.targets is not None:
            values += list(spreads(result.targets))
        self.rows.append((step, torch.stack(values), lr, wd, momentum, data_s))

    def flush(self) -> dict | None:
        """Write the pending rows; returns the last one (None if nothing was pending)."""
        if not self.rows:
            return None
        # every rank has rows of the same lengths (the health steps are common): one reduction, one host sync
        values = dist_utils.mean_across_ranks(torch.cat([r[1] for r in self.rows]), self.env).tolist()
        now = time.perf_counter()
        step_s = (now - self.since) / len(self.rows)  # wall time per step over the window (device included)
        skipped_inputs = self.skipped_inputs()  # this rank's bad input files, by reason
        offset = 0
        for step, row_values, lr, wd, momentum, data_s in self.rows:
            loss, n_enc, n_pred, skipped, *measured = values[offset:offset + row_values.numel()]
            offset += row_values.numel()
            health = self.health.record(step, *measured) if measured else {}
            skipped = skipped > 0  # on any rank: DDP's averaged gradient is then non-finite on every rank
            self.skipped_total += skipped
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            if skipped:
                self.last_skipped = step
                log.warning("step %d skipped: non-finite loss or gradient (loss %s, grad norms %s / %s); weights, "
                            "optimizer state and EMA left as they were", step, loss, n_enc, n_pred)
            row = {"step": step, "loss": loss, "lr": lr, "wd": wd, "momentum": momentum, "grad_norm_encoder": n_enc,
                   "grad_norm_predictor": n_pred, "clips_per_s": self.batch * self.env.world_size / step_s,
                   "step_s": step_s, "data_s": data_s, "skipped_inputs": sum(skipped_inputs.values()),
                   **{f"skipped_{reason}": n for reason, n in skipped_inputs.items()},
                   "skipped_step": int(skipped), "skipped_steps_total": self.skipped_total, **health}
            if self.metrics is not None:
                self.metrics.write(row)
            if math.isfinite(loss):
                if math.isnan(self.first_loss):
                    self.first_loss = loss
                self.last_loss = loss
        self.rows, self.since = [], now
        return row


class StopRequest:
    """Turns SIGTERM (preemption) into a request to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, env: dist_utils.DistEnv) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it at the same steps)."""
        if not env.enabled:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


class RunDir:
    """Paths of one training run: config.yaml, metrics.csv, loss.png, train.log, and its checkpoints."""

    def __init__(self, root: str | Path, cfg: Config):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.csv"
        self.loss_plot = self.root / "loss.png"
        self.log_file = self.root / "train.log"
        self.checkpoints = ckpt.CheckpointFolder(self.root / "checkpoints", cfg.logging.keep_last,
                                                 cfg.logging.keep_every)
        self.latest = self.checkpoints.latest


OOM_ADVICE = ("lower data.batch_size, set model.activation_checkpointing=true, use meta.computation=fast (one packed "
              "pass for all masks), or train at a smaller data.crop_size / data.num_frames")


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
          device: str | None = None, max_steps: int | None = None, progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir` (default: the config's logging.folder, else runs/<config name>); `max_steps`
    stops early (schedules unchanged). `resume` (also meta.load_checkpoint without a meta.read_checkpoint, as the
    official configs say it): continue from the newest usable checkpoint there, or start fresh (and say so) when
    there is none, so one command serves a job's first start and every requeue. A cooldown
    (optimization.is_anneal) starts from optimization.anneal_ckpt, and continues from its own checkpoints with
    optimization.resume_anneal or `resume`; meta.load_checkpoint with meta.read_checkpoint resumes the training
    state of that file (_start_state); `overwrite` starts again whatever the config says. Without a way to
    continue or `overwrite`, a run directory that holds a checkpoint is refused. Under torchrun (WORLD_SIZE > 1)
    each process trains its shard of the data."""
    run = RunDir(run_dir or cfg.logging.folder or Path("runs") / cfg.name, cfg)
    if resume and overwrite:
        raise UserError("resume and overwrite exclude each other: continue the run, or start it again")
    if cfg.optimization.is_anneal:  # as the official code: continue a cooldown only when asked to (resume_anneal)
        implied = cfg.optimization.resume_anneal
    else:
        implied = cfg.meta.load_checkpoint and not cfg.meta.read_checkpoint
    resume = resume or (implied and not overwrite)
    if run.checkpoints.candidates() and not (resume or overwrite):
        raise FileExistsError(f"{run.root} already holds a checkpoint ({run.checkpoints.candidates()[0]}); pass "
                              f"--resume to continue it, --overwrite to start again, or choose another --run-dir")
    joined = not torch.distributed.is_initialized()
    env, dev = dist_utils.init_distributed(pick_device(device), cfg.meta.dist_timeout_minutes)
    file_log = None
    if env.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        file_log = logging.FileHandler(run.log_file)
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(file_log)
    try:
        return _train(cfg, run, resume, overwrite, dev, max_steps, progress and env.is_main, env)
    except torch.OutOfMemoryError as e:
        raise RunStopped(f"out of memory with data.batch_size={cfg.data.batch_size} on {dev}: {OOM_ADVICE}. "
                         f"The last checkpoint ({run.latest}) is intact.") from e
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()
        if joined:  # leave the process group we joined: gloo/NCCL threads must not outlive it at exit
            dist_utils.shutdown()


def uses_fsdp(cfg: Config, env: dist_utils.DistEnv) -> bool:
    """Whether the networks are FSDP2-sharded: meta.data_parallel=fsdp under torchrun with several processes."""
    return env.enabled and cfg.meta.data_parallel == "fsdp"


def wrap_for_data_parallel(model: VJEPA, cfg: Config, env: dist_utils.DistEnv, device: torch.device) -> EMA:
    """Wrap the networks for torchrun's ranks (DDP replicas or FSDP2 shards; nothing on one process) and return
    the EMA over their final parameters. DDP: the fused EMA flattens the parameters before DDP registers them.
    FSDP: all three networks are sharded block by block alike, so the EMA is a `_foreach_lerp_` over matching
    local shards (flat buffers cannot hold FSDP's sharded parameters). Both: V-JEPA 2's mask tokens that not every
    step uses stay whole, outside DDP / FSDP, averaged after the backward (distributed.sync_sometimes_used), so
    DDP also takes the reference computation's call per clip-length group (FSDP cannot: refused)."""
    sometimes, never = model.mask_tokens_not_always_used()
    if uses_fsdp(cfg, env):
        if cfg.meta.computation == "reference" and model.clip_lengths > 1:  # a network call per group held
            raise UserError(f"meta.data_parallel=fsdp: the reference computation runs the networks once per "
                            f"clip-length group (data.dataset_fpcs={cfg.data.dataset_fpcs}), as many times as a rank "
                            f"holds groups, which FSDP cannot; use meta.computation=fast or meta.data_parallel=ddp")
        dist_utils.wrap_fsdp(model.encoder, Block, block_methods=("forward_packed",))
        dist_utils.wrap_fsdp(model.predictor, Block, block_methods=("forward_packed",), sometimes_used=sometimes,
                             never_used=never)
        dist_utils.wrap_fsdp(model.target_encoder, Block, block_methods=("forward_packed",), forward_only=True)
        return EMA(model, fused=False)
    ema = EMA(model, fused=cfg.meta.computation == "fast")
    if env.enabled:
        model.encoder = dist_utils.wrap_ddp(model.encoder, device)
        model.predictor = dist_utils.wrap_ddp(model.predictor, device, sometimes_used=sometimes, never_used=never)
    return ema


def _resume_state(run: RunDir, overwrite: bool, resume: bool, device: torch.device,
                  env: dist_utils.DistEnv) -> ckpt.TrainingState | None:
    """The state to continue from: rank 0 finds the newest usable checkpoint (setting damaged ones aside), then the
    other ranks load the same one. None: a fresh start (the old checkpoints are removed with `overwrite`). When no
    checkpoint is usable, every rank stops with rank 0's message (rather than the others waiting for it)."""
    state, stopped = None, None
    if env.is_main:
        try:
            if resume:
                state = run.checkpoints.load_newest(device)
                if state is None:
                    log.info("--resume: no checkpoint in %s yet; starting a fresh run (a first start, or a job "
                             "stopped before its first checkpoint)", run.checkpoints.folder)
            elif overwrite and run.checkpoints.candidates():
                log.warning("--overwrite: removing the checkpoints of the earlier run in %s", run.checkpoints.folder)
                run.checkpoints.clear()
        except RunStopped as e:
            stopped = e
    message = dist_utils.from_main(env, str(stopped) if stopped else None)  # the others wait here for rank 0
    if stopped:
        raise stopped
    if message:
        raise RunStopped(f"rank 0 could not resume: {message}")
    if resume and not env.is_main:
        state = run.checkpoints.load_newest(device, verify=False)
    return state


def _start_state(cfg: Config, run: RunDir) -> tuple[ckpt.TrainingState, str] | None:
    """What a run that does not continue its own checkpoints starts from, with the config key and file it comes
    from: for a cooldown (optimization.is_anneal), the networks and optimizer state of optimization.anneal_ckpt at
    step 0; with meta.load_checkpoint, the whole training state of meta.read_checkpoint as the official trainers
    resume it (checkpoint.training_state_of: ours at its step, an official file at its epoch x ipe, from where the
    lr / wd / EMA schedules, the masks and the data continue). None: a fresh start."""
    opt, meta = cfg.optimization, cfg.meta
    if opt.is_anneal:
        source = f"optimization.anneal_ckpt={opt.anneal_ckpt}"
        state = ckpt.training_state_of(ckpt.load_checkpoint(opt.anneal_ckpt), source, opt.ipe)
        missing = [name for name in NETWORKS if name not in state.networks]
        if missing:  # a cooldown continues pretraining: every network (the official loader needs them all too)
            raise UserError(f"{source}: no {', '.join(missing)} in it; a cooldown starts from a pretraining "
                            f"checkpoint holding {', '.join(NETWORKS)}")
        log.info("cooldown: starting from %s (networks%s), the lr decaying linearly from %g towards %g",
                 opt.anneal_ckpt, " and optimizer state" if state.optimizer else "", opt.lr, opt.final_lr)
        return replace(state, step=0, rng={}, health={}, skipped_steps=0), source  # the official cooldown: epoch 0
    if not (meta.load_checkpoint and meta.read_checkpoint):
        return None
    path = Path(meta.read_checkpoint)
    if cfg.data.dataset_fpcs is None:  # V-JEPA 1 reads it in its run directory (V-JEPA 2: as given)
        path = run.root / path
    source = f"meta.read_checkpoint={meta.read_checkpoint}"
    if not path.is_file():
        raise UserError(f"{source}: no such file ({path})")
    raw = ckpt.load_checkpoint(path)
    state = ckpt.training_state_of(raw, source, opt.ipe)
    log.info("%s: resumed %s, %s at step %d (%s); the lr / wd / EMA schedules, masks and data continue from there",
             source, ", ".join(state.networks), "the optimizer state" if state.optimizer else
             "a fresh optimizer (the file holds no optimizer state)", state.step,
             "its step, RNG and health monitor" if ckpt.is_ours(raw) else
             f"an official file: its epoch {raw.get('epoch') or 0} x optimization.ipe={opt.ipe}")
    return state, source


def _train(cfg: Config, run: RunDir, resume: bool, overwrite: bool, device: torch.device, max_steps: int | None,
           progress: bool, env: dist_utils.DistEnv) -> TrainResult:
    if env.is_main:
        paths = dataset_paths(cfg)  # generates the embedded dataset once, before the other ranks look for it
    dist_utils.barrier(env)
    if not env.is_main:
        paths = dataset_paths(cfg)
    if cfg.optimization.ipe is None:  # one pass over the data, as the official trainers take the loader's length
        cfg = resolve_ipe(cfg, steps_per_pass(cfg, paths, env.world_size))
        run = RunDir(run.root, cfg)  # meta.save_every_freq's logging.keep_every counts the resolved steps
        log.info("optimization.ipe null: %d steps per epoch (one pass over the data)", cfg.optimization.ipe)
    model = build_model(cfg, device)
    fsdp = uses_fsdp(cfg, env)
    schedule = Schedule.from_config(cfg.optimization)
    total = min(cfg.total_steps, max_steps) if max_steps else cfg.total_steps
    health = HealthMonitor(cfg.logging.health_every, cfg.logging.collapse_fraction)

    resumed = _resume_state(run, overwrite, resume, device, env)
    start_from = (resumed, str(run.checkpoints.folder)) if resumed is not None else _start_state(cfg, run)
    start, skipped_total, optimizer_state = 0, 0, None
    if start_from is not None:
        state, source = start_from
        model.load_networks(state.networks)
        if state.rng:
            ckpt.set_rng_state(state.rng)
        if state.health:
            health.load_state_dict(state.health)
        start, skipped_total, optimizer_state = state.step, state.skipped_steps, state.optimizer or None
        if resumed is not None:
            log.info("resumed %s at step %d", run.checkpoints.folder, start)
    ema = wrap_for_data_parallel(model, cfg, env, device)  # after loading: FSDP shards the loaded weights
    optimizer = build_optimizer(cfg.optimization, model.encoder, model.predictor, fused=True)
    if optimizer_state is not None:
        optimizer_state = adapt_optimizer_state(optimizer, optimizer_state, source)
        if fsdp:
            dist_utils.load_full_optimizer_state(model, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)

    def save(step: int) -> None:
        if fsdp:  # full state dicts gathered to rank 0: the same checkpoint format as DDP and one process
            networks = {name: dist_utils.full_model_state(getattr(model, name)) for name in NETWORKS}
            optimizer_saved = dist_utils.full_optimizer_state(model, optimizer)
        else:
            dist_utils.assert_replicas_equal({name: model.unwrapped(name) for name in NETWORKS}, env)
            networks = {name: model.unwrapped(name).state_dict() for name in NETWORKS}
            optimizer_saved = optimizer.state_dict()
        if env.is_main:
            run.checkpoints.save(ckpt.TrainingState(step, cfg.to_dict(), networks, optimizer_saved, ckpt.rng_state(),
                                                    health.state_dict(), pending.skipped_total))
        dist_utils.barrier(env)

    if env.is_main:
        save_config(cfg, run.config)
    metrics = None
    if env.is_main:
        metrics = MetricsLog(run.metrics, METRIC_FIELDS, resume_step=start if resumed is not None else None)
    accumulation = cfg.optimization.accumulation_steps
    # the loader's batches are micro-batches: step s takes its batches s*accumulation .. (s+1)*accumulation - 1
    loader = build_train_loader(cfg, paths, start_step=start * accumulation, rank=env.rank,
                                world_size=env.world_size)
    masks = masks_generators(cfg)
    batch = cfg.data.batch_size
    clip_after = schedule.warmup_steps
    log.info("training %s on %s x %d: steps %d -> %d, batch %d per rank x %d accumulation steps = %d clips per step, "
             "run dir %s", cfg.name, device, env.world_size, start, total, batch, accumulation,
             batch * accumulation * env.world_size, run.root)
    log.info("one pass over the data is %d steps; the schedules count optimization.ipe=%d steps per epoch",
             steps_per_pass(cfg, paths, env.world_size), cfg.optimization.ipe)

    pending = StepLog(metrics, batch * accumulation, lambda: dict(loader.stats), env, health, skipped_total)
    t_start = time.perf_counter()
    step, stopped_by = start, None
    bar = tqdm(total=total, initial=start, disable=not progress, desc=cfg.name, unit="step", dynamic_ncols=True)
    model.train()
    try:
        with StopRequest() as stop:
            while step < total:
                t0 = time.perf_counter()
                clips = [move_to(next(loader)[0], device) for _ in range(accumulation)]
                t_data = time.perf_counter() - t0
                # drawn on the CPU (no device sync for their sizes) while the device works on the last step
                batches = step_batches(clips, masks, cfg, step, device)
                lr, wd = schedule.lr(step + 1), schedule.wd(step + 1)
                apply_schedule(optimizer, lr, wd)
                max_norm = cfg.optimization.clip_grad if step >= clip_after else None
                momentum = schedule.momentum(step)
                result = train_step(model, optimizer, ema, batches, computation=cfg.meta.computation,
                                    autocast=autocast_for(cfg, device), max_norm=max_norm, momentum=momentum,
                                    keep_targets=health.due(step))
                pending.add(step, result, lr, wd, momentum, t_data)
                step += 1
                bar.update(1)
                boundary = step % cfg.logging.log_every == 0 or step == total
                if boundary:
                    last = pending.flush()  # the one host synchronisation every log_every steps
                    _check_skipped(pending, cfg, run)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    clips_s=f"{last['clips_per_s']:.1f}")
                if (stop.requested if not env.enabled else boundary and stop.agreed(env)) and step < total:
                    pending.flush()
                    save(step)
                    stopped_by = "SIGTERM"
                    log.warning("stopped by SIGTERM at step %d; checkpoint %s (continue with --resume)", step,
                                run.latest)
                    break
                if step % cfg.logging.checkpoint_every == 0 or step == total:
                    pending.flush()
                    save(step)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: saving %s", step, run.latest)
        pending.flush()
        save(step)
        raise
    except Exception as e:
        if env.enabled and dist_utils.is_collective_timeout(e):
            raise _hung_rank_error(cfg, run, env, step) from e
        raise
    finally:
        bar.close()
        loader.close()
        if metrics is not None:
            metrics.close()
            if run.metrics.exists():
                plot_loss(run.metrics, run.loss_plot, title=f"{cfg.name}: V-JEPA loss")
    seconds = time.perf_counter() - t_start
    log.info("done: steps %d -> %d in %.1f s, loss %.4f -> %.4f, %d skipped steps; checkpoint %s", start, step,
             seconds, pending.first_loss, pending.last_loss, pending.skipped_total, run.latest)
    return TrainResult(run.root, start, step, pending.first_loss, pending.last_loss, seconds,
                       pending.skipped_total, stopped_by)


def _hung_rank_error(cfg: Config, run: RunDir, env: dist_utils.DistEnv, step: int) -> RunStopped:
    """What a rank says when a collective timed out: who stopped answering, where, and what is safe."""
    silent = dist_utils.unanswering_ranks(env)
    who = f"rank(s) {', '.join(map(str, silent))}" if silent else "another rank"
    saved = run.checkpoints.latest_step if env.is_main else None
    kept = f"the last checkpoint (step {saved}) in {run.checkpoints.folder} is intact" if saved is not None else \
        f"the checkpoints in {run.checkpoints.folder} are intact"
    return RunStopped(f"rank {env.rank} stopped in step {step}: {who} did not answer for "
                      f"meta.dist_timeout_minutes={cfg.meta.dist_timeout_minutes:g} (a dead node, a stuck file "
                      f"system?); {kept}: continue with --resume once all ranks are healthy")


def _check_skipped(pending: StepLog, cfg: Config, run: RunDir) -> None:
    limit = cfg.optimization.max_consecutive_nonfinite
    if pending.skipped_in_a_row >= limit:
        raise RunStopped(
            f"{pending.skipped_in_a_row} consecutive steps (last: {pending.last_skipped}) had a non-finite loss or "
            f"gradient and were skipped; the weights are those before them and {run.latest} is intact. Try a lower "
            f"optimization.lr, gradient clipping from the start (optimization.clip_grad with a shorter warmup), "
            f"meta.dtype=bfloat16 or float32, and check the data (vjepa-fast data check).")
