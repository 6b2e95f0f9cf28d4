"""Checkpoints: atomic save/load of training state, import of official V-JEPA checkpoints, frozen encoders.

Our format is a dict with `format: "vjepa_fast"`, the three networks' state dicts (`encoder`, `predictor`,
`target_encoder`), `optimizer`, `step`, `rng` and the resolved `config`. The official format holds
`encoder` / `predictor` / `target_encoder` state dicts whose keys carry `module.` and `backbone.` prefixes;
the parameter names below the prefixes are the same as ours.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .config import MODEL_SIZES, config_from_dict
from .models import VisionTransformer

FORMAT = "vjepa_fast"
NETWORKS = ("encoder", "predictor", "target_encoder")
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file: name it
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


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


# ---- strict loading -----------------------------------------------------------------------------

def load_state_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict that fails naming every missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:8]}")
    if problems:
        raise ValueError(f"cannot load {what}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


# ---- official format ---------------------------------------------------------------------------

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
        raise ValueError(f"{source}: no {', '.join(NETWORKS)} entries; not an official V-JEPA checkpoint "
                         f"(keys: {sorted(state)[:10]})")
    out = {k: strip_official_prefixes(state[k]) for k in present}
    for k in ("epoch", "opt", "scaler", "batch_size", "world_size", "lr"):
        if k in state:
            out[k] = state[k]
    return out


def export_official(state: Mapping, path: str | Path) -> Path:
    """Write one of our checkpoints in the official layout: `module.backbone.` keys, `opt` (the param groups are
    in the official order), `epoch` (completed epochs), `loss`, `batch_size`, `world_size`, `lr`, `scaler`."""
    missing = [k for k in NETWORKS if k not in state]
    if missing:
        raise ValueError(f"cannot export: the checkpoint has no {', '.join(missing)}")
    cfg = state.get("config", {})
    opt_cfg, data_cfg = cfg.get("optimization", {}), cfg.get("data", {})
    out = {k: {f"module.backbone.{n}": t for n, t in state[k].items()} for k in NETWORKS}
    out.update(opt=state.get("optimizer"), scaler=None, epoch=state.get("step", 0) // max(1, opt_cfg.get("ipe", 1)),
               loss=state.get("loss"), batch_size=data_cfg.get("batch_size"),
               world_size=(cfg.get("nodes") or 1) * (cfg.get("tasks_per_node") or 1), lr=opt_cfg.get("lr"))
    return save_checkpoint(out, path)


# ---- frozen encoders ---------------------------------------------------------------------------

def _encoder_from_state(sd: Mapping[str, torch.Tensor], num_frames: int, num_heads: int | None,
                        uniform_power: bool) -> VisionTransformer:
    """Infer the encoder architecture of a state dict (shapes give all but the head count and frame count)."""
    try:
        conv = sd["patch_embed.proj.weight"]  # [D, 3, tubelet, patch, patch]
        pos = sd["pos_embed"]  # [1, N, D]
    except KeyError as e:
        raise ValueError(f"state dict has no {e.args[0]!r}: not a V-JEPA encoder") from None
    dim, _, tubelet, patch, _ = conv.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    if num_heads is None:
        by_dim = {d: h for d, _, h, _ in MODEL_SIZES.values()}
        if dim not in by_dim:
            raise ValueError(f"cannot infer the head count of an encoder of width {dim}: pass num_heads")
        num_heads = by_dim[dim]
    grid_depth = num_frames // tubelet
    grid_size = round((pos.shape[1] / grid_depth) ** 0.5)
    if grid_depth * grid_size ** 2 != pos.shape[1]:
        raise ValueError(f"pos_embed has {pos.shape[1]} tokens, not a {grid_depth}x{grid_size}x{grid_size} grid "
                         f"for num_frames={num_frames}; pass the num_frames the encoder was trained with")
    return VisionTransformer(img_size=grid_size * patch, num_frames=num_frames, patch_size=patch,
                             tubelet_size=tubelet, embed_dim=dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio, uniform_power=uniform_power)


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
    if key not in NETWORKS or key == "predictor":
        raise ValueError(f"key must be 'encoder' or 'target_encoder', got {key!r}")
    if state.get("format") == FORMAT:
        from .model import build_encoder  # the model module imports this one

        cfg = config_from_dict(state["config"])
        encoder = build_encoder(cfg)
        sd = state[key]
    else:
        sd = official_networks(state, source).get(key)
        if sd is None:
            raise ValueError(f"{source}: no {key!r} entry")
        encoder = _encoder_from_state(sd, num_frames or 16, num_heads, uniform_power=True)
    load_state_strict(encoder, sd, f"{key} from {source}")
    return encoder.eval().requires_grad_(False)
