"""The V-JEPA model container: context encoder, predictor, EMA target encoder, and the training loss.

The loss has two computations of the same function: "reference" (the official one: a context-encoder and a
predictor pass per mask, a layer-normalised copy of the targets, a gather and an L1 per mask) and "fast" (one
patch embedding, every mask's tokens packed into one pass of each network, the target norm and L1 fused in one
kernel). The tests hold them to the same loss and gradients.
"""
from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Callable, ContextManager, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .models import gather_tokens
from .models.build import build_encoder, build_predictor, load_weights_strict
from .models.packed import kernel_ops

if TYPE_CHECKING:
    from .config import Config

NETWORKS = ("encoder", "predictor", "target_encoder")  # the model's networks, by attribute (and checkpoint) name
COMPUTATIONS = ("fast", "reference")  # the two computations of the loss (config meta.computation)
TARGET_LN_EPS = 1e-5  # the regression target's layer norm (no affine)
STAGES = ("target", "context", "predictor", "loss")  # the parts of VJEPA.loss, in order


class VJEPA(nn.Module):
    """Holds `.encoder`, `.predictor` and `.target_encoder` (an EMA copy of the encoder, never trained)."""

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

    def load_networks(self, networks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Strictly load the `encoder` / `predictor` / `target_encoder` state dicts found in `networks` (what
        checkpoint.networks_of returns, for our checkpoints and official ones)."""
        found = [name for name in NETWORKS if name in networks]
        if not found:
            raise UserError(f"no {', '.join(NETWORKS)} state dicts to load (keys: {sorted(networks)[:10]})")
        for name in found:
            load_weights_strict(self.unwrapped(name), networks[name], name)

    def loss(self, clips: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor],
             computation: str = "reference", stage: Callable[[str], ContextManager] | None = None,
             return_targets: bool = False):
        """Mean over masks of mean(|prediction - layer_norm(target)|^p)/p at the predicted tokens.

        `stage(name)`, if given, wraps each of STAGES (a timer or profiler range; see vjepa_fast/bench/step.py).
        `return_targets`: also return the target encoder's features [B, N, D] (layer-normalised by the reference
        computation, raw by the fast one), e.g. for the health monitor, which then needs no second target pass."""
        if computation not in COMPUTATIONS:
            raise ValueError(f"unknown loss computation {computation!r}; available: {', '.join(COMPUTATIONS)}")
        if len(masks_enc) != len(masks_pred):
            raise ValueError(f"got {len(masks_enc)} context masks but {len(masks_pred)} prediction masks")
        stage = stage or (lambda name: contextlib.nullcontext())
        with stage("target"):
            h = self.targets(clips, computation)
        with stage("context"):
            z = self.encoder(clips, masks_enc, computation=computation)
        with stage("predictor"):
            pred = self.predictor(z, masks_enc, masks_pred, computation=computation)
        with stage("loss"):
            loss = self.objective(pred, h, masks_pred, computation)
        return (loss, h) if return_targets else loss

    @torch.no_grad()
    def targets(self, clips: torch.Tensor, computation: str) -> torch.Tensor:
        """Target-encoder features of the full clips: layer-normalised (reference); raw, for the fused loss (fast)."""
        h = self.target_encoder(clips, computation=computation)
        return h if computation == "fast" else F.layer_norm(h, (h.size(-1),), eps=TARGET_LN_EPS)

    def objective(self, pred, h, masks_pred, computation: str) -> torch.Tensor:
        """L1 (to the power loss_exp) between predictions and targets, averaged per mask, then over masks. The fast
        computation layer-normalises and gathers the target rows inside one fused kernel."""
        p = self.loss_exp
        if computation == "fast":
            _, l1 = kernel_ops(h.device)
            return l1(pred, h, masks_pred, eps=TARGET_LN_EPS, loss_exp=p)
        losses = [torch.mean(torch.abs(zi - gather_tokens(h, m)) ** p) / p for zi, m in zip(pred, masks_pred)]
        return sum(losses) / len(losses)
