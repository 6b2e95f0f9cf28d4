"""The V-JEPA model container: context encoder, predictor, EMA target encoder, and the training loss."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .checkpoint import NETWORKS, load_state_strict
from .config import Config
from .models import Predictor, VisionTransformer, gather_tokens
from .models.packed import PackedLayout

TARGET_LN_EPS = 1e-5


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


class VJEPA(nn.Module):
    """Holds `.encoder`, `.predictor` and `.target_encoder` (an EMA copy of the encoder, never trained)."""

    PATHS = ("reference", "fast")

    def __init__(self, cfg: Config):
        super().__init__()
        self.loss_exp = cfg.loss.loss_exp
        self.encoder = build_encoder(cfg)
        self.predictor = build_predictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        for net in (self.encoder, self.predictor, self.target_encoder):
            net.compiled = cfg.model.compile
        for net in (self.encoder, self.predictor):
            net.activation_checkpointing = cfg.model.activation_checkpointing

    def set_attn_backend(self, backend: str) -> None:
        for net in (self.encoder, self.predictor, self.target_encoder):
            net.set_attn_backend(backend)

    def load_networks(self, state: Mapping) -> None:
        """Strictly load the `encoder` / `predictor` / `target_encoder` state dicts found in `state`
        (one of our checkpoints, or what `checkpoint.import_official` returns)."""
        found = [name for name in NETWORKS if name in state]
        if not found:
            raise ValueError(f"no {', '.join(NETWORKS)} state dicts to load (keys: {sorted(state)[:10]})")
        for name in found:
            load_state_strict(getattr(self, name), state[name], name)

    def loss(self, clips: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor],
             path: str = "reference") -> torch.Tensor:
        """Mean over masks of mean(|prediction - layer_norm(target)|^p)/p at the predicted tokens."""
        if path not in self.PATHS:
            raise ValueError(f"unknown loss path {path!r}; available: {', '.join(self.PATHS)}")
        if len(masks_enc) != len(masks_pred):
            raise ValueError(f"got {len(masks_enc)} context masks but {len(masks_pred)} prediction masks")
        if path == "fast":
            return self._fast_loss(clips, masks_enc, masks_pred)
        return self._reference_loss(clips, masks_enc, masks_pred)

    def _reference_loss(self, clips, masks_enc, masks_pred):
        """The official computation: one encoder and one predictor pass per mask."""
        with torch.no_grad():
            h = self.target_encoder(clips)
            h = F.layer_norm(h, (h.size(-1),), eps=TARGET_LN_EPS)
        p = self.loss_exp
        loss = 0.0
        for i, (m_enc, m_pred) in enumerate(zip(masks_enc, masks_pred)):
            z = self.predictor(self.encoder(clips, m_enc), m_enc, m_pred, i)
            loss = loss + torch.mean(torch.abs(z - gather_tokens(h, m_pred)) ** p) / p
        return loss / len(masks_pred)

    def _fast_loss(self, clips, masks_enc, masks_pred):
        """The same function with less work: one patch-embed, one fused gather of every mask's context tokens,
        one context-encoder and one predictor pass over the packed masks, the target encoder once, and the
        target layer-norm + L1 fused (never materialising normalised or gathered targets)."""
        gather, l1 = _kernel_ops(clips.device)
        with torch.no_grad():
            h = self.target_encoder.forward_dense_packed(clips)
        enc = self.encoder
        tokens = enc.embed(clips)
        x, _ = gather(tokens, masks_enc, pos=enc.pos_embed[0])
        B = clips.size(0)
        z = enc.forward_packed(x.to(tokens.dtype), PackedLayout.uniform(B, [m.size(1) for m in masks_enc]))
        pred = self.predictor.forward_packed(z, masks_enc, masks_pred)
        return l1(pred, h, masks_pred, eps=TARGET_LN_EPS, loss_exp=self.loss_exp)


def _kernel_ops(device: torch.device):
    """(gather_tokens, masked_l1_loss): the Triton kernels where they run (CUDA, or the Triton interpreter),
    their PyTorch references elsewhere."""
    if device.type == "cuda" or kernels.runs_on_cpu():
        return kernels.gather_tokens, kernels.masked_l1_loss
    return kernels.gather_tokens_reference, kernels.masked_l1_loss_reference
