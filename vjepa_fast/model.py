"""The V-JEPA model container: context encoder, predictor, EMA target encoder, and the training loss."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import NETWORKS, load_state_strict
from .config import Config
from .models import Predictor, VisionTransformer, gather_tokens
from .models.packed import kernel_ops

TARGET_LN_EPS = 1e-5
STAGES = ("target", "context", "predictor", "loss")  # the parts of VJEPA.loss, in order


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

    def unwrapped(self, name: str) -> nn.Module:
        """The network `name` itself, also when a DDP wrapper holds it."""
        net = getattr(self, name)
        return getattr(net, "module", net)

    def set_attn_backend(self, backend: str) -> None:
        for name in NETWORKS:
            self.unwrapped(name).set_attn_backend(backend)

    def load_networks(self, state: Mapping) -> None:
        """Strictly load the `encoder` / `predictor` / `target_encoder` state dicts found in `state`
        (one of our checkpoints, or what `checkpoint.import_official` returns)."""
        found = [name for name in NETWORKS if name in state]
        if not found:
            raise ValueError(f"no {', '.join(NETWORKS)} state dicts to load (keys: {sorted(state)[:10]})")
        for name in found:
            load_state_strict(self.unwrapped(name), state[name], name)

    def loss(self, clips: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor],
             path: str = "reference", stage: Callable[[str], ContextManager] | None = None,
             return_targets: bool = False):
        """Mean over masks of mean(|prediction - layer_norm(target)|^p)/p at the predicted tokens.

        `stage(name)`, if given, wraps each of STAGES (a timer or profiler range; see bench/step.py).
        `return_targets`: also return the target encoder's features [B, N, D] (layer-normalised on the reference
        path, raw on the fast path), e.g. for the health monitor, which then needs no second target pass."""
        if path not in self.PATHS:
            raise ValueError(f"unknown loss path {path!r}; available: {', '.join(self.PATHS)}")
        if len(masks_enc) != len(masks_pred):
            raise ValueError(f"got {len(masks_enc)} context masks but {len(masks_pred)} prediction masks")
        stage = stage or (lambda name: contextlib.nullcontext())
        with stage("target"):
            h = self.targets(clips, path)
        with stage("context"):
            z = self.context(clips, masks_enc, path)
        with stage("predictor"):
            pred = self.predict(z, masks_enc, masks_pred, path)
        with stage("loss"):
            loss = self.objective(pred, h, masks_pred, path)
        return (loss, h) if return_targets else loss

    @torch.no_grad()
    def targets(self, clips, path):
        """Target-encoder features of the full clips: layer-normalised (reference); raw, for the fused loss (fast)."""
        h = self.target_encoder(clips, path=path)
        return h if path == "fast" else F.layer_norm(h, (h.size(-1),), eps=TARGET_LN_EPS)

    def context(self, clips, masks_enc, path):
        """Context-encoder features: one pass per mask (reference), or one patch-embed, one fused gather of every
        mask's tokens with their position embeddings, and one pass over the packed masks (fast)."""
        return self.encoder(clips, masks_enc, path=path)

    def predict(self, z, masks_enc, masks_pred, path):
        """Predictions at the target tokens: one predictor pass per mask (reference) or one packed pass (fast)."""
        return self.predictor(z, masks_enc, masks_pred, path=path)

    def objective(self, pred, h, masks_pred, path):
        """L1 (to the power loss_exp) between predictions and targets, averaged per mask, then over masks. The fast
        path layer-normalises and gathers the target rows inside one fused kernel."""
        p = self.loss_exp
        if path == "fast":
            _, l1 = kernel_ops(h.device)
            return l1(pred, h, masks_pred, eps=TARGET_LN_EPS, loss_exp=p)
        losses = [torch.mean(torch.abs(zi - gather_tokens(h, m)) ** p) / p for zi, m in zip(pred, masks_pred)]
        return sum(losses) / len(losses)
