"""3D multi-block masks (docs/design.md, section 4), generated for the whole batch at once with tensor ops.

Per batch and per mask config one block size (t, h, w) is drawn from a generator seeded by the iteration
counter; per sample each block's position is uniform. The predicted region is the union of the blocks
(with a temporal scale of 1 every block spans all time-steps), the context its complement; a sample with
an empty context is redrawn. Index lists are sorted ascending and cut to the batch minimum, so each mask is
a dense int64 [B, K] tensor.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch

from .config import MaskConfig

MAX_REDRAWS = 1000


def _as_mask_config(cfg) -> MaskConfig:
    if isinstance(cfg, MaskConfig):
        return cfg
    if isinstance(cfg, Mapping):
        known = {f.name for f in dataclasses.fields(MaskConfig)}
        return MaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in known})
    raise TypeError(f"mask config must be a MaskConfig or a mapping, got {type(cfg).__name__}")


class MaskGenerator:
    """Context (`masks_enc`) and prediction (`masks_pred`) index lists for every mask config."""

    def __init__(self, cfgs_mask: Sequence, crop_size: int = 224, num_frames: int = 16, patch_size: int = 16,
                 tubelet_size: int = 2):
        self.cfgs = [_as_mask_config(c) for c in cfgs_mask]
        self.duration = num_frames // tubelet_size
        self.height = self.width = crop_size // patch_size
        self.num_tokens = self.duration * self.height * self.width

    def block_size(self, cfg: MaskConfig, step: int) -> tuple[int, int, int]:
        """The (t, h, w) block size of one mask config at iteration `step` (the official draw and rounding)."""
        g = torch.Generator().manual_seed(step)
        r_t, r_s, r_ar = (torch.rand(1, generator=g).item() for _ in range(3))
        t_scale = cfg.temporal_scale[0] + r_t * (cfg.temporal_scale[1] - cfg.temporal_scale[0])
        s_scale = cfg.spatial_scale[0] + r_s * (cfg.spatial_scale[1] - cfg.spatial_scale[0])
        ar = cfg.aspect_ratio[0] + r_ar * (cfg.aspect_ratio[1] - cfg.aspect_ratio[0])
        t = max(1, int(self.duration * t_scale))
        keep = int(self.height * self.width * s_scale)
        h = min(int(round(math.sqrt(keep * ar))), self.height)
        w = min(int(round(math.sqrt(keep / ar))), self.width)
        return t, h, w

    def _predicted(self, n: int, cfg: MaskConfig, size: tuple[int, int, int], device, generator) -> torch.Tensor:
        """[n, num_tokens] bool: True where a token lies in the union of `cfg.num_blocks` random blocks."""
        t, h, w = size
        shape = (n, cfg.num_blocks, 1)

        def inside(extent: int, length: int) -> torch.Tensor:  # [n, blocks, extent]: is pos in [first, first+length)
            first = torch.randint(0, extent - length + 1, shape, device=device, generator=generator)
            offset = torch.arange(extent, device=device) - first
            return (offset >= 0) & (offset < length)

        in_t = inside(self.duration, t).float()
        in_hw = (inside(self.height, h)[..., :, None] & inside(self.width, w)[..., None, :]).flatten(2).float()
        # union over blocks of (time-steps x spatial box): a batched boolean matmul
        pred = (in_t.transpose(1, 2) @ in_hw) > 0  # [n, T, H*W]
        max_context = max(1, int(self.duration * cfg.max_temporal_keep))
        if max_context < self.duration:  # context may only span the first time-steps
            pred[:, max_context:] = True
        return pred.flatten(1)

    def _indices(self, ctx: torch.Tensor, keep_enc: int, keep_pred: int, truncation: str,
                 generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted context and prediction indices per row, cut to `keep_*`: the lowest ones, or a random subset."""
        pred = ~ctx
        if truncation == "random":  # rank each row's entries in a random order (1 = kept first)
            noise = torch.rand(ctx.shape, device=ctx.device, generator=generator)
            rank_ctx = torch.where(ctx, noise, 2.0).argsort(dim=1).argsort(dim=1) + 1
            rank_pred = torch.where(pred, noise, 2.0).argsort(dim=1).argsort(dim=1) + 1
        else:  # rank by position: the n-th context (prediction) token of a row has rank n
            small = torch.int16 if self.num_tokens < 2 ** 15 else torch.int32
            rank_ctx = ctx.cumsum(dim=1, dtype=small)
            rank_pred = torch.arange(1, self.num_tokens + 1, device=ctx.device, dtype=small) - rank_ctx
        # nonzero walks the rows in order, each row ascending, and finds exactly `keep` entries per row
        enc = (ctx & (rank_ctx <= keep_enc)).nonzero()[:, 1].view(-1, keep_enc)
        prd = (pred & (rank_pred <= keep_pred)).nonzero()[:, 1].view(-1, keep_pred)
        return enc, prd

    def gen(self, batch_size: int, step: int, device=None,
            generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Masks for one batch: (masks_enc, masks_pred), one int64 [B, K] tensor per mask config each."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if generator is not None:
            device = generator.device
        device = torch.device(device) if device is not None else torch.device("cpu")
        masks_enc, masks_pred = [], []
        for cfg in self.cfgs:
            size = self.block_size(cfg, step)
            pred = self._predicted(batch_size, cfg, size, device, generator)
            for _ in range(MAX_REDRAWS):
                n_ctx = self.num_tokens - pred.sum(dim=1)
                fewest, most = torch.stack([n_ctx.min(), n_ctx.max()]).tolist()
                if fewest > 0:
                    break
                redraw = self._predicted(batch_size, cfg, size, device, generator)
                pred = torch.where((n_ctx == 0)[:, None], redraw, pred)
            else:
                raise RuntimeError(f"mask config {cfg} leaves no context token after {MAX_REDRAWS} redraws")
            keep_enc = fewest if cfg.max_keep is None else min(fewest, cfg.max_keep)
            enc, prd = self._indices(~pred, keep_enc, self.num_tokens - most, cfg.truncation, generator)
            masks_enc.append(enc)
            masks_pred.append(prd)
        return masks_enc, masks_pred
