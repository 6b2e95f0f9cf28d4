"""The narrow V-JEPA predictor: context tokens plus per-mask learnable mask tokens -> predicted target features."""
import torch
from torch import nn

from .packed import PackedLayout
from .pos_embed import sincos_3d
from .vit import LN_EPS, Block, gather_tokens, init_weights, run_blocks_packed


class Predictor(nn.Module):
    """forward(z, mask_ctx, mask_tgt, mask_index) -> [B, K_tgt, embed_dim] predictions at the target indices."""

    def __init__(self, *, num_frames: int = 16, img_size: int = 224, patch_size: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 1024, predictor_embed_dim: int = 384, depth: int = 12, num_heads: int = 16,
                 mlp_ratio: float = 4.0, uniform_power: bool = True, num_mask_tokens: int = 2,
                 zero_init_mask_tokens: bool = True, attn_backend: str = "sdpa", fp32_residual: bool = True):
        super().__init__()
        grid_depth, grid_size = num_frames // tubelet_size, img_size // patch_size
        self.fp32_residual = fp32_residual
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1, predictor_embed_dim)) for _ in range(num_mask_tokens))
        pos = sincos_3d(predictor_embed_dim, grid_depth, grid_size, uniform_power)
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

    def forward(self, z, masks_ctx: list[torch.Tensor], masks_tgt: list[torch.Tensor],
                computation: str = "reference"):
        """Predictions at every mask's target tokens. Reference: z a list of [B, Kc_i, D] context features, one
        predictor pass per mask -> list of [B, Kt_i, D]. Fast: z packed [sum_i B*Kc_i, D] (order: mask, sample,
        index), one pass over all masks -> [sum_i B*Kt_i, D] in the same order."""
        if computation == "fast":
            return self._forward_fast(z, masks_ctx, masks_tgt)
        return [self._forward_reference(zi, mc, mt, i) for i, (zi, mc, mt) in enumerate(zip(z, masks_ctx, masks_tgt))]

    def _forward_reference(self, z: torch.Tensor, mask_ctx: torch.Tensor, mask_tgt: torch.Tensor,
                           mask_index: int) -> torch.Tensor:
        B = z.size(0)
        pos = self.predictor_pos_embed.expand(B, -1, -1)
        x = self.predictor_embed(z)
        x = (x + gather_tokens(pos, mask_ctx)).to(x.dtype)  # as the official in-place add
        tgt = self.mask_tokens[mask_index % len(self.mask_tokens)] + gather_tokens(pos, mask_tgt)
        dtype = self._stream_dtype(x, tgt)
        x = torch.cat([x.to(dtype), tgt.to(dtype)], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        n_ctx = mask_ctx.size(1)
        return self.predictor_proj(self.predictor_norm(x)[:, n_ctx:])

    def _stream_dtype(self, ctx: torch.Tensor, tgt: torch.Tensor) -> torch.dtype:
        """Official quirk: fp32 mask tokens concatenated to a low-precision context make the stream fp32."""
        return torch.promote_types(ctx.dtype, tgt.dtype) if self.fp32_residual else ctx.dtype

    def _forward_fast(self, z: torch.Tensor, masks_ctx: list[torch.Tensor],
                      masks_tgt: list[torch.Tensor]) -> torch.Tensor:
        B = masks_ctx[0].size(0)
        pos = self.predictor_pos_embed[0]
        ctx = self.predictor_embed(z)
        ctx = (ctx + pos[torch.cat([m.reshape(-1) for m in masks_ctx])]).to(ctx.dtype)
        tgt = torch.cat([(self.mask_tokens[i % len(self.mask_tokens)][0] + pos[m.reshape(-1)])
                         for i, m in enumerate(masks_tgt)])
        dtype = self._stream_dtype(ctx, tgt)
        kc, kt = [m.size(1) for m in masks_ctx], [m.size(1) for m in masks_tgt]
        order, tgt_rows = _interleave(B, kc, kt, ctx.size(0), z.device)
        x = torch.cat([ctx.to(dtype), tgt.to(dtype)])[order]  # each sequence: its context rows, then its targets
        x = run_blocks_packed(self.predictor_blocks, x, PackedLayout.uniform(B, [c + t for c, t in zip(kc, kt)]),
                              compiled=self.compiled, activation_checkpointing=self.activation_checkpointing)
        return self.predictor_proj(self.predictor_norm(x[tgt_rows]))


def _interleave(B: int, kc: list[int], kt: list[int], ctx_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row order that turns [all context rows; all target rows] (each in mask, sample order) into sequences
    [ctx_ib, tgt_ib] per (mask i, sample b), and where the target rows land in that order."""
    order, tgt_rows = [], []
    c_off = t_off = x_off = 0
    b = torch.arange(B, device=device)[:, None]
    for c, t in zip(kc, kt):
        ctx = c_off + b * c + torch.arange(c, device=device)
        tgt = ctx_rows + t_off + b * t + torch.arange(t, device=device)
        order.append(torch.cat([ctx, tgt], dim=1).reshape(-1))
        tgt_rows.append((x_off + b * (c + t) + c + torch.arange(t, device=device)).reshape(-1))
        c_off, t_off, x_off = c_off + B * c, t_off + B * t, x_off + B * (c + t)
    return torch.cat(order), torch.cat(tgt_rows)
