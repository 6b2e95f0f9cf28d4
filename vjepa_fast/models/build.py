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

# (embed_dim, depth, num_heads, mlp_ratio) of each named encoder: the V-JEPA and V-JEPA 2 constructors'.
MODEL_SIZES = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
    "vit_giant_xformers": (1408, 40, 22, 48 / 11),  # V-JEPA 2's ViT-g: head dim 64
    # V-JEPA 2's constructors pass their 64/13 as `mpl_ratio`, which the ViT ignores: they build ratio 4
    "vit_gigantic": (1664, 48, 16, 4.0),
    "vit_gigantic_xformers": (1664, 48, 26, 4.0),
}
# V-JEPA 2 names whose constructor turns on 3D RoPE (model.use_rope) itself.
ROPE_ALIASES = {"vit_large_rope": "vit_large", "vit_huge_rope": "vit_huge", "vit_giant_rope": "vit_giant",
                "vit_giant_xformers_rope": "vit_giant_xformers"}
MODEL_SIZES.update({alias: MODEL_SIZES[name] for alias, name in ROPE_ALIASES.items()})


def build_encoder(cfg: Config) -> VisionTransformer:
    dim, depth, heads, ratio = cfg.encoder_size
    d = cfg.data
    return VisionTransformer(img_size=d.crop_size, num_frames=d.num_frames, patch_size=d.patch_size,
                             tubelet_size=d.tubelet_size, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=ratio, uniform_power=cfg.model.uniform_power,
                             attn_backend=cfg.model.attn_backend, use_rope=cfg.model.use_rope)


PREDICTOR_MLP_RATIO = 4.0  # the official predictors', whatever the encoder's (ViT-g's is 48/11)


def build_predictor(cfg: Config) -> Predictor:
    dim, _, heads, _ = cfg.encoder_size
    d, m = cfg.data, cfg.model
    return Predictor(num_frames=d.num_frames, img_size=d.crop_size, patch_size=d.patch_size,
                     tubelet_size=d.tubelet_size, embed_dim=dim, predictor_embed_dim=m.pred_embed_dim,
                     depth=m.pred_depth, num_heads=m.pred_num_heads or heads, mlp_ratio=PREDICTOR_MLP_RATIO,
                     uniform_power=m.uniform_power, num_mask_tokens=num_mask_tokens(cfg),
                     zero_init_mask_tokens=m.zero_init_mask_tokens, attn_backend=m.attn_backend,
                     fp32_residual=m.predictor_fp32_residual, use_rope=m.use_rope)


def num_mask_tokens(cfg: Config) -> int:
    """V-JEPA: one per mask config. V-JEPA 2 (data.dataset_fpcs): one per mask config and clip length."""
    return len(cfg.mask) * (len(cfg.data.dataset_fpcs) if cfg.data.dataset_fpcs else 1)


# The head count of an official encoder of each width: V-JEPA's constructors, and V-JEPA 2's (RoPE models).
V1_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant")
HEADS_BY_WIDTH = {d: h for name, (d, _, h, _) in MODEL_SIZES.items() if name in V1_NAMES}
ROPE_HEADS_BY_WIDTH = {**HEADS_BY_WIDTH, MODEL_SIZES["vit_giant_xformers"][0]: MODEL_SIZES["vit_giant_xformers"][2]}
ROPE_IMG_SIZE = 256  # V-JEPA 2's pretraining crop: the nominal input of a RoPE encoder known by its weights alone


def encoder_from_weights(sd: Mapping[str, torch.Tensor], num_frames: int, num_heads: int | None,
                         use_rope: bool | None = None, img_size: int | None = None) -> VisionTransformer:
    """An encoder shaped for the state dict `sd`, not yet loaded. Its shapes give the width, depth, MLP and patch;
    a sin-cos encoder's table gives its grid, so `num_frames` sets its crop. RoPE (default: when `sd` has no
    pos_embed, as V-JEPA 2's training checkpoints) has no table and takes clips of any size: `num_frames` x
    `img_size` (default 256) is only its nominal input (eval's clips). The heads default to the official model of
    that width (V-JEPA 2's for RoPE: 22 for ViT-g)."""
    try:
        conv = sd["patch_embed.proj.weight"]  # [D, 3, tubelet, patch, patch]
    except KeyError as e:
        raise UserError(f"state dict has no {e.args[0]!r}: not a V-JEPA encoder") from None
    dim, _, tubelet, patch, _ = conv.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    use_rope = "pos_embed" not in sd if use_rope is None else use_rope
    if num_heads is None:
        by_width = ROPE_HEADS_BY_WIDTH if use_rope else HEADS_BY_WIDTH
        if dim not in by_width:
            raise UserError(f"cannot infer the head count of an encoder of width {dim}: pass num_heads")
        num_heads = by_width[dim]
    if use_rope:
        img_size = img_size or ROPE_IMG_SIZE
    else:
        if "pos_embed" not in sd:
            raise UserError("state dict has no 'pos_embed': a RoPE encoder (pass use_rope=True), or not a V-JEPA one")
        tokens = sd["pos_embed"].shape[1]
        grid_depth = num_frames // tubelet
        grid_size = round((tokens / grid_depth) ** 0.5)
        if grid_depth * grid_size ** 2 != tokens:
            raise UserError(f"pos_embed has {tokens} tokens, not a {grid_depth}x{grid_size}x{grid_size} grid "
                            f"for num_frames={num_frames}; pass the num_frames the encoder was trained with")
        img_size = grid_size * patch
    return VisionTransformer(img_size=img_size, num_frames=num_frames, patch_size=patch, tubelet_size=tubelet,
                             embed_dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             use_rope=use_rope)


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
