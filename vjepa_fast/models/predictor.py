"""The narrow V-JEPA predictor: context tokens plus learnable mask tokens -> predicted target features."""
import torch
from torch import nn

from .. import kernels
from .packed import PackedLayout
from .pos_embed import sincos_3d
from .vit import LN_EPS, Block, gather_tokens, init_weights, run_blocks_packed


class Predictor(nn.Module):
    """forward(z, masks_ctx, masks_tgt, computation, mask_token_ids) -> predictions at every mask's target tokens.

    Positions: added sin-cos tables (V-JEPA), or 3D RoPE in every attention (V-JEPA 2, `use_rope`), where each
    mask token rotates with the position of the target it stands for. Mask `i` uses mask token
    `mask_token_ids[i]` (V-JEPA: one per mask config; V-JEPA 2: one per clip-length group, see VJEPA)."""

    def __init__(self, *, num_frames: int = 16, img_size: int = 224, patch_size: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 1024, predictor_embed_dim: int = 384, depth: int = 12, num_heads: int = 16,
                 mlp_ratio: float = 4.0, uniform_power: bool = True, num_mask_tokens: int = 2,
                 zero_init_mask_tokens: bool = True, attn_backend: str = "sdpa", fp32_residual: bool = True,
                 use_rope: bool = False):
        super().__init__()
        grid_depth, self.grid_size = num_frames // tubelet_size, img_size // patch_size
        self.fp32_residual = fp32_residual
        self.use_rope = use_rope
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1, predictor_embed_dim)) for _ in range(num_mask_tokens))
        self.predictor_pos_embed = None  # with RoPE: no table, none in checkpoints
        if not use_rope:
            pos = sincos_3d(predictor_embed_dim, grid_depth, self.grid_size, uniform_power)
            self.predictor_pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LN_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        self.compiled = False
        self.activation_checkpointing = False
        init_weights(self, self.predictor_blocks)
        if not zero_init_mask_tokens:
            for tok in self.mask_tokens:
                nn.init.trunc_normal_(tok, std=0.02)

    def set_attn_backend(self, backend: str) -> None:
        for blk in self.predictor_blocks:
            blk.attn.backend = backend

    def positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(t, h, w) of token ids on the square grid of the configured crop (as the official predictor)."""
        return kernels.grid_positions(token_ids, self.grid_size, self.grid_size)

    def mask_token(self, index: int) -> torch.Tensor:
        return self.mask_tokens[index % len(self.mask_tokens)]

    def forward(self, z, masks_ctx: list[torch.Tensor], masks_tgt: list[torch.Tensor],
                computation: str = "reference", mask_token_ids: list[int] | None = None):
        """Predictions at every mask's target tokens. Reference: z a list of [B, Kc_i, D] context features, one
        predictor pass per mask -> list of [B, Kt_i, D]. Fast: z packed [sum_i B_i*Kc_i, D] (order: mask, sample,
        index; masks may have different batch sizes: clip-length groups), one pass over all masks ->
        [sum_i B_i*Kt_i, D] in the same order. `mask_token_ids`: the mask token of each mask (default: mask i uses
        token i)."""
        ids = list(range(len(masks_tgt))) if mask_token_ids is None else mask_token_ids
        if computation == "fast":
            return self._forward_fast(z, masks_ctx, masks_tgt, ids)
        return [self._forward_reference(zi, mc, mt, t) for zi, mc, mt, t in zip(z, masks_ctx, masks_tgt, ids)]

    def _forward_reference(self, z: torch.Tensor, mask_ctx: torch.Tensor, mask_tgt: torch.Tensor,
                           token: int) -> torch.Tensor:
        B = z.size(0)
        x = self.predictor_embed(z)
        tgt = self.mask_token(token).expand(B, mask_tgt.size(1), -1)
        if self.predictor_pos_embed is not None:
            pos = self.predictor_pos_embed.expand(B, -1, -1)
            x = (x + gather_tokens(pos, mask_ctx)).to(x.dtype)  # as the official in-place add
            tgt = tgt + gather_tokens(pos, mask_tgt)
        dtype = self._stream_dtype(x, tgt)
        x = torch.cat([x.to(dtype), tgt.to(dtype)], dim=1)
        n_ctx = mask_ctx.size(1)
        if not self.use_rope:
            for blk in self.predictor_blocks:
                x = blk(x)
            return self.predictor_proj(self.predictor_norm(x)[:, n_ctx:])
        # V-JEPA 2: rows sorted by position before the blocks, and back after (no change but for rounding)
        ids = torch.cat([mask_ctx, mask_tgt], dim=1)
        order = ids.argsort(dim=1)
        rows = torch.arange(B, device=x.device)[:, None]
        x, ids = x[rows, order], ids[rows, order]
        positions = self.positions(ids)
        for blk in self.predictor_blocks:
            x = blk(x, positions)
        x = self.predictor_norm(x)[rows, order.argsort(dim=1)]
        return self.predictor_proj(x[:, n_ctx:])

    def _stream_dtype(self, ctx: torch.Tensor, tgt: torch.Tensor) -> torch.dtype:
        """Official quirk: fp32 mask tokens concatenated to a low-precision context make the stream fp32."""
        return torch.promote_types(ctx.dtype, tgt.dtype) if self.fp32_residual else ctx.dtype

    def _forward_fast(self, z: torch.Tensor, masks_ctx: list[torch.Tensor], masks_tgt: list[torch.Tensor],
                      token_ids: list[int]) -> torch.Tensor:
        batch = [m.size(0) for m in masks_ctx]
        ctx_ids = torch.cat([m.reshape(-1) for m in masks_ctx])
        tgt_ids = torch.cat([m.reshape(-1) for m in masks_tgt])
        ctx = self.predictor_embed(z)
        tgt = torch.cat([self.mask_token(t)[0].expand(m.numel(), -1) for t, m in zip(token_ids, masks_tgt)])
        if self.predictor_pos_embed is not None:
            pos = self.predictor_pos_embed[0]
            ctx = (ctx + pos[ctx_ids]).to(ctx.dtype)
            tgt = tgt + pos[tgt_ids]
        dtype = self._stream_dtype(ctx, tgt)
        kc, kt = [m.size(1) for m in masks_ctx], [m.size(1) for m in masks_tgt]
        order, tgt_rows = _interleave(batch, kc, kt, ctx.size(0), z.device)
        x = torch.cat([ctx.to(dtype), tgt.to(dtype)])[order]  # each sequence: its context rows, then its targets
        positions = self.positions(torch.cat([ctx_ids, tgt_ids])[order]) if self.use_rope else None
        layout = PackedLayout(tuple((b, c + t) for b, c, t in zip(batch, kc, kt)))
        x = run_blocks_packed(self.predictor_blocks, x, layout, compiled=self.compiled,
                              activation_checkpointing=self.activation_checkpointing, positions=positions)
        return self.predictor_proj(self.predictor_norm(x[tgt_rows]))


def _interleave(batch: list[int], kc: list[int], kt: list[int], ctx_rows: int,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row order that turns [all context rows; all target rows] (each in mask, sample order; mask i has batch[i]
    samples) into sequences [ctx_ib, tgt_ib] per (mask i, sample b), and where the target rows land in that order."""
    order, tgt_rows = [], []
    c_off = t_off = x_off = 0
    for B, c, t in zip(batch, kc, kt):
        b = torch.arange(B, device=device)[:, None]
        ctx = c_off + b * c + torch.arange(c, device=device)
        tgt = ctx_rows + t_off + b * t + torch.arange(t, device=device)
        order.append(torch.cat([ctx, tgt], dim=1).reshape(-1))
        tgt_rows.append((x_off + b * (c + t) + c + torch.arange(t, device=device)).reshape(-1))
        c_off, t_off, x_off = c_off + B * c, t_off + B * t, x_off + B * (c + t)
    return torch.cat(order), torch.cat(tgt_rows)
