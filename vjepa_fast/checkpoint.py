"""Checkpoints: the layout of our training state (spelled here only), atomic save and load, the official V-JEPA
format in and out, and frozen encoders from either.

Ours is a dict with `format: "vjepa_fast"` and `version`, the three networks' state dicts (`encoder`,
`predictor`, `target_encoder`), `optimizer`, `step`, `rng`, `health`, `skipped_steps` and the resolved `config`
(TrainingState). The official format holds `encoder` / `predictor` / `target_encoder` state dicts whose keys carry
`module.` and `backbone.` prefixes; the parameter names below the prefixes are the same as ours.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import pickle
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .config import Config, config_from_dict
from .errors import RunStopped, UserError
from .model import NETWORKS
from .models import VisionTransformer
from .models.build import build_encoder, encoder_from_weights, load_weights_strict
from .optim import OFFICIAL_IMPLEMENTATION

log = logging.getLogger(__name__)

FORMAT = "vjepa_fast"
VERSION = 1
OFFICIAL_PREFIXES = ("module.", "backbone.")


# ---- atomic, verifiable save; safe load ---------------------------------------------------------

class _HashingWriter(io.RawIOBase):
    """A file object that writes through to `f` and keeps the sha256 and size of everything written."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.f.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


def checksum_path(path: Path) -> Path:
    """The sidecar that records a checkpoint's sha256 and size when it was written."""
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: Mapping, path: str | Path) -> Path:
    """Write `state` to `path` atomically (a temp file in the same folder, fsync, rename over), with a checksum
    sidecar (`<path>.sha256`: the sha256 and size of the bytes written) so a later reader can tell a file the file
    system damaged. A full disk leaves the previous file intact and raises RunStopped naming the space needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    pending = _pending_checksum(path)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(dict(state), writer)
            f.flush()
            os.fsync(f.fileno())
        pending.write_text(f"{writer.sha256.hexdigest()} {writer.bytes}\n")
        # a crash between these two renames leaves the new file with its checksum still pending: verify_checksum
        # accepts the pending one when it matches
        os.replace(tmp, path)
        os.replace(pending, checksum_path(path))
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
        if not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
            raise
        needed, free = _state_bytes(state), shutil.disk_usage(path.parent).free
        raise RunStopped(f"no space left on the device of {path.parent} while writing {path.name}: about "
                         f"{needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; the previous checkpoint there is "
                         f"intact. Free space (or move the run directory) and continue with --resume.") from e
    return path


def _pending_checksum(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256.pending")


def _state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def verify_checksum(path: Path) -> None:
    """Raise UserError if `path` no longer has the sha256 and size recorded when it was written (no record: nothing
    to check, as for official checkpoints and files copied without it)."""
    recorded = [p for p in (checksum_path(path), _pending_checksum(path)) if p.is_file()]
    if not recorded:
        return
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    for record in recorded:
        digest, written = record.read_text().split()
        if (h.hexdigest(), size) == (digest, int(written)):
            if record != checksum_path(path):  # written, renamed, then interrupted before its checksum was
                os.replace(record, checksum_path(path))
            return
    digest, written = recorded[0].read_text().split()
    why = f"is {size} bytes, {written} were written: truncated" if size != int(written) else \
        "does not match the sha256 recorded when it was written: damaged"
    raise UserError(f"checkpoint {path} {why}")


# The only globals a checkpoint may name besides torch's own: numpy arrays (the RNG state of our checkpoints).
# Anything else, a pickled function call above all, is refused without running it.
SAFE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), getattr(np, "_core", np).multiarray._reconstruct]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The dict a checkpoint file holds (ours or an official one), loaded with torch.load(weights_only=True): tensors
    and plain Python values only, so a downloaded file cannot run code. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        raise UserError(f"refused to load {path}: it holds Python objects beyond tensors and plain values "
                        f"({', '.join(unsafe) or e}), which could run code when loaded. A V-JEPA checkpoint has "
                        f"none; if you made this file yourself and trust it, load it with torch.load("
                        f"weights_only=False) and save its tensors again.") from None
    except Exception as e:  # truncated or foreign file: name it
        raise UserError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if g not in {f"{x.__module__}.{x.__qualname__}" for x in SAFE_GLOBALS}]
    except Exception:
        return []


def is_ours(state: Mapping) -> bool:
    return state.get("format") == FORMAT


# ---- our training state -------------------------------------------------------------------------

@dataclass
class TrainingState:
    """Everything a run needs to continue exactly where it stopped."""
    step: int
    config: dict  # the resolved config (Config.to_dict())
    networks: dict[str, dict]  # NETWORKS -> state dict
    optimizer: dict
    rng: dict  # rng_state()
    health: dict  # HealthMonitor.state_dict()
    skipped_steps: int  # steps skipped for a non-finite loss or gradient, in all

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "step": self.step, "config": self.config, **self.networks,
                "optimizer": self.optimizer, "rng": self.rng, "health": self.health,
                "skipped_steps": self.skipped_steps}

    @classmethod
    def from_dict(cls, state: Mapping, source: str | Path) -> TrainingState:
        if not is_ours(state):
            raise UserError(f"{source} is not a vjepa_fast training checkpoint (an official one? it holds "
                            f"{sorted(state)[:8]})")
        missing = [k for k in ("step", "config", *NETWORKS, "optimizer", "rng", "health", "skipped_steps")
                   if k not in state]
        if missing:
            raise UserError(f"{source}: a vjepa_fast checkpoint without {', '.join(missing)}")
        return cls(state["step"], state["config"], {k: state[k] for k in NETWORKS}, state["optimizer"],
                   state["rng"], state["health"], state["skipped_steps"])

    @property
    def cfg(self) -> Config:
        return config_from_dict(self.config)


def save_training_state(state: TrainingState, path: str | Path) -> Path:
    return save_checkpoint(state.to_dict(), path)


def load_training_state(path: str | Path, map_location="cpu") -> TrainingState:
    return TrainingState.from_dict(load_checkpoint(path, map_location), path)


def _move(path: Path, to: Path) -> None:
    """Rename a checkpoint with its checksum sidecar."""
    os.replace(path, to)
    if checksum_path(path).is_file():
        os.replace(checksum_path(path), checksum_path(to))


def _remove(path: Path) -> None:
    """Delete a checkpoint with its checksum sidecar."""
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


class CheckpointFolder:
    """A run's checkpoints: `latest.pt`, the newest, and `step_<N>.pt` for the ones before it (the last `keep_last`
    in all, and every `keep_every`-th step for good), each with its checksum sidecar. Resuming takes the newest
    that verifies and loads; one the file system damaged is set aside (renamed `*.damaged-<time>`), loudly."""

    def __init__(self, folder: str | Path, keep_last: int = 2, keep_every: int = 0):
        self.folder, self.keep_last, self.keep_every = Path(folder), keep_last, keep_every
        self.latest = self.folder / "latest.pt"
        self.latest_step: int | None = None  # the step latest.pt holds, once saved or resumed here

    def step_path(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def candidates(self) -> list[Path]:
        """Every checkpoint here, newest first."""
        return [p for p in [self.latest, *self._older()] if p.is_file()]

    def _older(self) -> list[Path]:
        """The step_<N>.pt files, newest first."""
        return sorted(self.folder.glob("step_*.pt"), reverse=True)

    def save(self, state: TrainingState) -> Path:
        """Write `state` as latest.pt; the previous latest becomes step_<N>.pt; prune beyond keep_last/keep_every.
        The new file is written in full (as step_<N>.pt) before anything is renamed, so a failed write (a full disk)
        changes nothing, and at every moment the newest checkpoint is latest.pt or the newest step_<N>.pt."""
        written = save_training_state(state, self.step_path(state.step))
        if self.latest_step is not None and self.latest_step != state.step and self.latest.is_file():
            _move(self.latest, self.step_path(self.latest_step))
        _move(written, self.latest)
        self.latest_step = state.step
        self._prune()
        return self.latest

    def _prune(self) -> None:
        for path in self._older()[max(0, self.keep_last - 1):]:
            step = int(path.stem.removeprefix("step_"))
            if not (self.keep_every and step % self.keep_every == 0):
                _remove(path)

    def clear(self) -> None:
        """Remove every checkpoint here (starting a run again in its folder)."""
        for path in self.candidates():
            _remove(path)
        self.latest_step = None

    def load_newest(self, map_location="cpu", *, verify: bool = True) -> TrainingState | None:
        """The newest checkpoint that verifies and loads (None when there is none); those that do not are set aside
        with an error in the log. Raises RunStopped when there are checkpoints but none is usable. verify=False
        skips the checksums and sets nothing aside (for ranks that follow the one that verified)."""
        damaged = []
        for path in self.candidates():
            try:
                if verify:
                    verify_checksum(path)
                state = load_training_state(path, map_location)
            except UserError as e:
                if not verify:
                    raise
                aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
                _move(path, aside)
                log.error("UNUSABLE CHECKPOINT %s: %s. Set aside as %s; trying the one before it.", path, e, aside.name)
                damaged.append(f"{path.name} ({e})")
                continue
            self.latest_step = state.step if path == self.latest else None
            if damaged:
                log.error("resuming from %s (step %d), not the newest checkpoint: %s", path, state.step,
                          "; ".join(damaged))
            return state
        if damaged:
            raise RunStopped(f"no usable checkpoint in {self.folder}: {'; '.join(damaged)} (set aside as "
                             f"*.damaged-*). Restore a copy, or start again with --overwrite.")
        return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the official format ------------------------------------------------------------------------

def strip_official_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the leading `module.` / `backbone.` prefixes of every key (in any order and number)."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in OFFICIAL_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def import_official(path: str | Path) -> dict:
    """Read an official-format checkpoint into our naming: {encoder, predictor, target_encoder, epoch, opt}."""
    return official_networks(load_checkpoint(path), path)


def official_networks(state: Mapping, source: str | Path) -> dict:
    """import_official for a checkpoint already in memory (`source` names it in errors)."""
    present = [k for k in NETWORKS if k in state]
    if not present:
        raise UserError(f"{source}: no {', '.join(NETWORKS)} entries; not an official V-JEPA checkpoint "
                        f"(keys: {sorted(state)[:10]})")
    out = {k: strip_official_prefixes(state[k]) for k in present}
    for k in ("epoch", "opt", "scaler", "batch_size", "world_size", "lr"):
        if k in state:
            out[k] = state[k]
    return out


def networks_of(state: Mapping, source: str | Path) -> dict[str, dict]:
    """The networks' state dicts (our names) of a checkpoint in memory, ours or official."""
    if is_ours(state):
        return {k: state[k] for k in NETWORKS if k in state}
    return {k: v for k, v in official_networks(state, source).items() if k in NETWORKS}


def training_state_of(state: Mapping, source: str | Path, ipe: int) -> TrainingState:
    """The training state a run continues from a checkpoint in memory, as the official trainers resume: ours as
    saved; an official one at step `epoch` x `ipe` (its completed epochs; the official code advances its schedules
    and masks that many iterations), with its networks and `opt` (`{}` when it has none; the same AdamW param
    groups as ours, optim.param_groups) and no RNG or health state."""
    if is_ours(state):
        return TrainingState.from_dict(state, source)
    return TrainingState(int(state.get("epoch") or 0) * ipe, {}, networks_of(state, source), state.get("opt") or {},
                         rng={}, health={}, skipped_steps=0)


def export_official(state: TrainingState, path: str | Path) -> Path:
    """Write one of our checkpoints in the official layout: `module.backbone.` keys, `opt` (the param groups in the
    official order, with the official AdamW's settings: not fused), `epoch` (completed epochs), `batch_size`,
    `world_size`, `lr`, `scaler`."""
    cfg = state.config
    opt_cfg, data_cfg = cfg.get("optimization", {}), cfg.get("data", {})
    out = {k: {f"module.backbone.{n}": t for n, t in state.networks[k].items()} for k in NETWORKS}
    opt = state.optimizer and {**state.optimizer, "param_groups": [{**g, **OFFICIAL_IMPLEMENTATION}
                                                                   for g in state.optimizer["param_groups"]]}
    out.update(opt=opt, scaler=None, epoch=state.step // max(1, opt_cfg.get("ipe", 1)),
               batch_size=data_cfg.get("batch_size"),
               world_size=(cfg.get("nodes") or 1) * (cfg.get("tasks_per_node") or 1), lr=opt_cfg.get("lr"))
    return save_checkpoint(out, path)


# ---- frozen encoders ---------------------------------------------------------------------------

def load_encoder(path: str | Path, key: str = "target_encoder", *, num_frames: int | None = None,
                 num_heads: int | None = None, use_rope: bool | None = None,
                 img_size: int | None = None) -> VisionTransformer:
    """A frozen encoder (eval mode, no grad) mapping [B, 3, T, H, W] clips to [B, N, D] features.

    Takes our checkpoints (architecture from their config) and official V-JEPA and V-JEPA 2 ones (architecture
    inferred from the weights, see models.build.encoder_from_weights; `num_frames` defaults to 16). An official
    file is a RoPE one when its encoder has no pos_embed, or when it is a released V-JEPA 2 model file: those carry
    an unused sin-cos table, and their predictor ten mask tokens. How a file with a table is read is logged;
    `use_rope` overrides. A RoPE encoder takes clips of any size (`num_frames` / `img_size`: its nominal ones).
    """
    return encoder_from_checkpoint(load_checkpoint(path), path, key, num_frames=num_frames, num_heads=num_heads,
                                   use_rope=use_rope, img_size=img_size)


# The released V-JEPA 2 model files hold ten predictor mask tokens (their loader builds the predictor with ten) and an
# unused sin-cos table; training checkpoints of either version hold one token per mask config and clip length.
RELEASED_VJEPA2_MASK_TOKENS = 10


def _mask_token_count(predictor: Mapping) -> int:
    return sum(1 for name in predictor if name.startswith("mask_tokens."))


def encoder_from_checkpoint(state: Mapping, source: str | Path, key: str = "target_encoder", *,
                            num_frames: int | None = None, num_heads: int | None = None,
                            use_rope: bool | None = None, img_size: int | None = None,
                            cfg: Config | None = None) -> VisionTransformer:
    """load_encoder for a checkpoint already in memory (`source` names it in errors); `cfg`: one of ours' config,
    where the caller has already built it from the state."""
    if key not in ("encoder", "target_encoder"):
        raise UserError(f"key must be 'encoder' or 'target_encoder', got {key!r}")
    networks = networks_of(state, source)
    if key not in networks:
        raise UserError(f"{source}: no {key!r} entry")
    weights = networks[key]
    if is_ours(state):
        encoder = build_encoder(cfg or config_from_dict(state["config"]))
    else:
        if use_rope is None and "pos_embed" in weights:
            use_rope = _mask_token_count(networks.get("predictor", {})) == RELEASED_VJEPA2_MASK_TOKENS
            log.info("%s: read as %s (pass use_rope=%s, --%suse-rope, if it is not)", source,
                     "a released V-JEPA 2 file: a RoPE encoder, its unused pos_embed dropped" if use_rope else
                     "a V-JEPA encoder with sin-cos positions", not use_rope, "" if not use_rope else "no-")
        encoder = encoder_from_weights(weights, num_frames or 16, num_heads, use_rope, img_size)
        if encoder.use_rope:  # released V-JEPA 2 files carry a sin-cos table that RoPE models do not use
            weights = {k: v for k, v in weights.items() if k != "pos_embed"}
    load_weights_strict(encoder, weights, f"{key} from {source}")
    return encoder.eval().requires_grad_(False)
