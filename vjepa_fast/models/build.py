"""Building the networks: from a config, or (an encoder) from its weights alone, and loading weights strictly."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from ..errors import UserError
from .predictor import Predictor
from .vit import VisionTransformer

if TYPE_CHECKING:
    from ..config import Config

# (embed_dim, depth, num_heads, mlp_ratio) of each named encoder.
MODEL_SIZES = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}


def build_encoder(cfg: Config) -> VisionTransformer:
    dim, depth, heads, ratio = cfg.encoder_size
    d = cfg.data
    return VisionTransformer(img_size=d.crop_size, num_frames=d.num_frames, patch_size=d.patch_size,
                             tubelet_size=d.tubelet_size, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=ratio, uniform_power=cfg.model.uniform_power,
                             attn_backend=cfg.model.attn_backend)


def build_predictor(cfg: Config) -> Predictor:
    dim, _, heads, ratio = cfg.encoder_size
    d, m = cfg.data, cfg.model
    return Predictor(num_frames=d.num_frames, img_size=d.crop_size, patch_size=d.patch_size,
                     tubelet_size=d.tubelet_size, embed_dim=dim, predictor_embed_dim=m.pred_embed_dim,
                     depth=m.pred_depth, num_heads=m.pred_num_heads or heads, mlp_ratio=ratio,
                     uniform_power=m.uniform_power, num_mask_tokens=len(cfg.mask),
                     zero_init_mask_tokens=m.zero_init_mask_tokens, attn_backend=m.attn_backend,
                     fp32_residual=m.predictor_fp32_residual)


def encoder_from_weights(sd: Mapping[str, torch.Tensor], num_frames: int, num_heads: int | None,
                         uniform_power: bool = True) -> VisionTransformer:
    """An encoder shaped for the state dict `sd` (its shapes give all but the head and frame counts: the heads
    default to the named model of that width), not yet loaded."""
    try:
        conv = sd["patch_embed.proj.weight"]  # [D, 3, tubelet, patch, patch]
        pos = sd["pos_embed"]  # [1, N, D]
    except KeyError as e:
        raise UserError(f"state dict has no {e.args[0]!r}: not a V-JEPA encoder") from None
    dim, _, tubelet, patch, _ = conv.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    if num_heads is None:
        by_dim = {d: h for d, _, h, _ in MODEL_SIZES.values()}
        if dim not in by_dim:
            raise UserError(f"cannot infer the head count of an encoder of width {dim}: pass num_heads")
        num_heads = by_dim[dim]
    grid_depth = num_frames // tubelet
    grid_size = round((pos.shape[1] / grid_depth) ** 0.5)
    if grid_depth * grid_size ** 2 != pos.shape[1]:
        raise UserError(f"pos_embed has {pos.shape[1]} tokens, not a {grid_depth}x{grid_size}x{grid_size} grid "
                        f"for num_frames={num_frames}; pass the num_frames the encoder was trained with")
    return VisionTransformer(img_size=grid_size * patch, num_frames=num_frames, patch_size=patch,
                             tubelet_size=tubelet, embed_dim=dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio, uniform_power=uniform_power)


def load_weights_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
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
        raise UserError(f"cannot load {what}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
