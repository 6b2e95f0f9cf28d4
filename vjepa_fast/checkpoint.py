"""Checkpoints: the layout of our training state (spelled here only), atomic save and load, the official V-JEPA
format in and out, and frozen encoders from either.

Ours is a dict with `format: "vjepa_fast"` and `version`, the three networks' state dicts (`encoder`,
`predictor`, `target_encoder`), `optimizer`, `step`, `rng`, `health`, `skipped_steps` and the resolved `config`
(TrainingState). The official format holds `encoder` / `predictor` / `target_encoder` state dicts whose keys carry
`module.` and `backbone.` prefixes; the parameter names below the prefixes are the same as ours.
"""
from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .config import Config, config_from_dict
from .errors import UserError
from .model import NETWORKS
from .models import VisionTransformer
from .models.build import build_encoder, encoder_from_weights, load_weights_strict

FORMAT = "vjepa_fast"
VERSION = 1
OFFICIAL_PREFIXES = ("module.", "backbone.")


# ---- atomic save / load -----------------------------------------------------------------------

def save_checkpoint(state: Mapping, path: str | Path) -> Path:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The dict a checkpoint file holds (ours or an official one); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file: name it
        raise UserError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


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


def export_official(state: TrainingState, path: str | Path) -> Path:
    """Write one of our checkpoints in the official layout: `module.backbone.` keys, `opt` (the param groups are
    in the official order), `epoch` (completed epochs), `batch_size`, `world_size`, `lr`, `scaler`."""
    cfg = state.config
    opt_cfg, data_cfg = cfg.get("optimization", {}), cfg.get("data", {})
    out = {k: {f"module.backbone.{n}": t for n, t in state.networks[k].items()} for k in NETWORKS}
    out.update(opt=state.optimizer, scaler=None, epoch=state.step // max(1, opt_cfg.get("ipe", 1)),
               batch_size=data_cfg.get("batch_size"),
               world_size=(cfg.get("nodes") or 1) * (cfg.get("tasks_per_node") or 1), lr=opt_cfg.get("lr"))
    return save_checkpoint(out, path)


# ---- frozen encoders ---------------------------------------------------------------------------

def load_encoder(path: str | Path, key: str = "target_encoder", *, num_frames: int | None = None,
                 num_heads: int | None = None) -> VisionTransformer:
    """A frozen encoder (eval mode, no grad) mapping [B, 3, T, H, W] clips to [B, N, D] features.

    Takes our checkpoints (architecture from their config) and official ones (architecture inferred from
    the weights; `num_frames` defaults to 16 and `num_heads` to the named model of that width).
    """
    return encoder_from_checkpoint(load_checkpoint(path), path, key, num_frames=num_frames, num_heads=num_heads)


def encoder_from_checkpoint(state: Mapping, source: str | Path, key: str = "target_encoder", *,
                            num_frames: int | None = None, num_heads: int | None = None) -> VisionTransformer:
    """load_encoder for a checkpoint already in memory (`source` names it in errors)."""
    if key not in ("encoder", "target_encoder"):
        raise UserError(f"key must be 'encoder' or 'target_encoder', got {key!r}")
    networks = networks_of(state, source)
    if key not in networks:
        raise UserError(f"{source}: no {key!r} entry")
    if is_ours(state):
        encoder = build_encoder(config_from_dict(state["config"]))
    else:
        encoder = encoder_from_weights(networks[key], num_frames or 16, num_heads)
    load_weights_strict(encoder, networks[key], f"{key} from {source}")
    return encoder.eval().requires_grad_(False)
