"""The V-JEPA model container: context encoder, predictor, EMA target encoder, and the training loss.

The loss has two computations of the same function: "reference" (the official one: a context-encoder and a
predictor pass per mask, a layer-normalised copy of the targets, a gather and an L1 per mask; per clip length,
for V-JEPA 2's batches of several) and "fast" (one patch embedding per clip, every mask's tokens of every clip
length packed into one pass of each network, the target norm and L1 fused in one kernel). The tests hold them to
the same loss and gradients.
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
        self.token_per_group = cfg.data.dataset_fpcs is not None  # V-JEPA 2's mask-token indexing
        self.clip_lengths = len(set(cfg.data.dataset_fpcs or [cfg.data.num_frames]))  # groups a batch may hold
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

    def loss(self, clips, masks_enc, masks_pred, computation: str = "reference",
             stage: Callable[[str], ContextManager] | None = None, return_targets: bool = False):
        """Mean over masks of mean(|prediction - layer_norm(target)|^p)/p at the predicted tokens.

        clips [B, 3, T, H, W] with its masks (a list per mask config), or clips of several lengths (V-JEPA 2's
        `data.dataset_fpcs`): a list of clip tensors, one per clip-length group, with a list of masks for each; the
        mean is then over every (group, mask) pair alike, as the official code weighs them. The reference
        computation runs the groups one after another as the official code does; the fast one packs every group
        into the same passes. `stage(name)`, if given, wraps each of STAGES (a timer or profiler range; see
        vjepa_fast/bench/step.py). `return_targets`: also return the target encoder's features [B, N, D] of the
        (first) group (layer-normalised by the reference computation, raw by the fast one), e.g. for the health
        monitor, which then needs no second target pass."""
        if computation not in COMPUTATIONS:
            raise ValueError(f"unknown loss computation {computation!r}; available: {', '.join(COMPUTATIONS)}")
        several = isinstance(clips, (list, tuple))
        groups = list(zip(clips, masks_enc, masks_pred)) if several else [(clips, masks_enc, masks_pred)]
        for _, enc, pred in groups:
            if len(enc) != len(pred):
                raise ValueError(f"got {len(enc)} context masks but {len(pred)} prediction masks")
        stage = stage or (lambda name: contextlib.nullcontext())
        run = self._fast if computation == "fast" else self._reference
        loss, h = run(groups, stage)
        return (loss, h) if return_targets else loss

    def _reference(self, groups, stage):
        """The official computation, group by group and mask by mask; the mean over every (group, mask) term."""
        terms, first_targets = [], None
        for g, (clips, masks_enc, masks_pred) in enumerate(groups):
            with stage("target"):
                h = self.targets(clips, "reference")
            with stage("context"):
                z = self.encoder(clips, masks_enc, computation="reference")
            with stage("predictor"):
                pred = self.predictor(z, masks_enc, masks_pred, computation="reference",
                                      mask_token_ids=self.mask_token_ids(len(masks_pred), g))
            with stage("loss"):
                p = self.loss_exp
                terms += [torch.mean(torch.abs(zi - gather_tokens(h, m)) ** p) / p for zi, m in zip(pred, masks_pred)]
            first_targets = h if first_targets is None else first_targets
        with stage("loss"):
            return sum(terms) / len(terms), first_targets

    def _fast(self, groups, stage):
        """Every group in one target, one context and one predictor pass; the fused norm + L1 per group."""
        clips = [c for c, _, _ in groups]
        flat_enc = [m for _, enc, _ in groups for m in enc]
        flat_pred = [m for _, _, pred in groups for m in pred]
        with stage("target"):
            h = self.targets(clips, "fast")
        with stage("context"):
            z = self.encoder(clips, [enc for _, enc, _ in groups], computation="fast")
        with stage("predictor"):
            tokens = [t for g, (_, _, pred) in enumerate(groups) for t in self.mask_token_ids(len(pred), g)]
            pred = self.predictor(z, flat_enc, flat_pred, computation="fast", mask_token_ids=tokens)
        with stage("loss"):
            l1 = kernel_ops(pred.device).masked_l1_loss
            sizes = [sum(m.numel() for m in masks) for _, _, masks in groups]  # each group's predicted rows
            per_group = [l1(rows, target, masks, eps=TARGET_LN_EPS, loss_exp=self.loss_exp)  # mean over its masks
                         for rows, target, (_, _, masks) in zip(pred.split(sizes), h, groups)]
            counts = [len(masks) for _, _, masks in groups]
            loss = per_group[0] if len(groups) == 1 else sum(n * l for n, l in zip(counts, per_group)) / sum(counts)
        return loss, h[0]

    def mask_token_ids(self, num_masks: int, group: int) -> list[int]:
        """Which mask token each mask's targets get. V-JEPA: mask i, token i. V-JEPA 2: every mask of the g-th
        clip-length group of the batch, token g (the official indexing, shared by the mask configs)."""
        return [group] * num_masks if self.token_per_group else list(range(num_masks))

    def mask_tokens_not_always_used(self) -> tuple[list[str], list[str]]:
        """The predictor's mask tokens (parameter names) that only some steps use, and those that no step uses.
        V-JEPA 2 keeps one token per mask config and dataset (the official layout) but a batch's g-th clip-length
        group uses token g: token 0 always, tokens 1 .. L-1 (L distinct clip lengths) when a batch holds that many
        groups, the rest never. V-JEPA: every token, every step."""
        if not self.token_per_group:
            return [], []
        names = [f"mask_tokens.{i}" for i in range(len(self.unwrapped("predictor").mask_tokens))]
        return names[1:self.clip_lengths], names[self.clip_lengths:]

    @torch.no_grad()
    def targets(self, clips, computation: str):
        """Target-encoder features of the full clips: layer-normalised (reference); raw, for the fused loss (fast),
        which takes a list of clip tensors, one per clip length (one pass; a list of features back)."""
        if computation == "fast":
            return self.target_encoder(clips, computation="fast")
        h = self.target_encoder(clips, computation=computation)
        return F.layer_norm(h, (h.size(-1),), eps=TARGET_LN_EPS)
