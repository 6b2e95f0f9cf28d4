"""Video ViT encoder (docs/design.md, section 4): 3D patch embed, fixed sin-cos positions, pre-norm blocks.

Parameter names follow the official V-JEPA code, so official checkpoints load after stripping their
`module.` / `backbone.` prefixes.
"""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import packed
from .pos_embed import sincos_3d

LN_EPS = 1e-6
INIT_STD = 0.02


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx int64 [B, K] -> x[b, idx[b]] as [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class Attention(nn.Module):
    """Multi-head self-attention; `backend` "eager" is the plain math, any other uses F.scaled_dot_product_attention
    on these dense sequences (the backends differ on packed sequences, see packed.py)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = packed.attend_dense(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_packed(self, x: torch.Tensor, layout: packed.PackedLayout, compiled: bool = False) -> torch.Tensor:
        """The same block over a packed [T, C] matrix of sequences described by `layout`."""
        attn_in, attn_out_mlp = packed.compiled_rowwise() if compiled else (packed.attn_in, packed.attn_out_mlp)
        qkv = attn_in(x, self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias, LN_EPS)
        a = packed.packed_attention(qkv, layout, self.attn.num_heads, self.attn.backend)
        return attn_out_mlp(x, a, self.attn.proj.weight, self.attn.proj.bias, self.norm2.weight, self.norm2.bias,
                            self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias, LN_EPS)


def run_blocks_packed(blocks: nn.ModuleList, x: torch.Tensor, layout: packed.PackedLayout, *,
                      compiled: bool = False, activation_checkpointing: bool = False) -> torch.Tensor:
    """Run `blocks` over a packed matrix; with activation checkpointing each block's activations are recomputed
    in the backward instead of stored."""
    for blk in blocks:
        if activation_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk.forward_packed, x, layout, compiled, use_reentrant=False)
        else:
            x = blk.forward_packed(x, layout, compiled)
    return x


class PatchEmbed3D(nn.Module):
    """[B, 3, T, H, W] -> [B, T/tubelet * H/patch * W/patch, D] tokens in t, h, w order."""

    def __init__(self, patch_size: int, tubelet_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        k = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=k, stride=k)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def init_weights(module: nn.Module, blocks: nn.ModuleList) -> None:
    """Official init: trunc-normal(0.02) for Linear/Conv weights, zero biases, unit LayerNorm weights, then the
    output projections of block l (attn.proj, mlp.fc2) divided by sqrt(2*l)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class VisionTransformer(nn.Module):
    """The V-JEPA video encoder. forward(x, mask=None): all tokens, or only those at `mask` [B, K] indices."""

    def __init__(self, *, img_size: int = 224, num_frames: int = 16, patch_size: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 uniform_power: bool = True, attn_backend: str = "sdpa"):
        super().__init__()
        self.img_size, self.num_frames = img_size, num_frames
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.grid_depth, self.grid_size = num_frames // tubelet_size, img_size // patch_size
        self.num_patches = self.grid_depth * self.grid_size ** 2
        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, embed_dim)
        pos = sincos_3d(embed_dim, self.grid_depth, self.grid_size, uniform_power)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)  # in checkpoints, never trained
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.compiled = False  # fast path: torch.compile the row-wise halves of the blocks
        self.activation_checkpointing = False  # fast path: recompute block activations in the backward
        init_weights(self, self.blocks)

    def set_attn_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn.backend = backend

    def forward(self, x: torch.Tensor, masks: torch.Tensor | list[torch.Tensor] | None = None,
                computation: str = "reference"):
        """Features of clips x [B, 3, T, H, W].

        masks None: all tokens [B, N, D]. One int64 [B, K] mask: the kept tokens [B, K, D]. A list of masks:
        reference computation, one pass per mask (as the official multi-mask wrapper) -> list of [B, K_i, D]; fast
        computation, one patch embedding, one fused packing of every mask's tokens and one pass over them ->
        [sum_i B*K_i, D] (order: mask, sample, index). Everything goes through forward() so that DDP / FSDP
        wrappers see it.
        """
        self._check_clips(x)
        if computation == "fast":
            return self._forward_fast(x, masks)
        if isinstance(masks, (list, tuple)):
            return [self._forward_reference(x, m) for m in masks]
        return self._forward_reference(x, masks)

    def _forward_reference(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(x)
        x = (x + self.pos_embed).to(x.dtype)  # as the official in-place add: low precision under autocast
        if mask is not None:
            x = gather_tokens(x, mask)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def _forward_fast(self, x: torch.Tensor, masks) -> torch.Tensor:
        tokens = self.patch_embed(x)
        B, N, D = tokens.shape
        if masks is None:  # every token of a clip as one sequence
            x = (tokens + self.pos_embed).to(tokens.dtype).reshape(B * N, D)
            layout = packed.PackedLayout.uniform(B, [N])
        else:
            masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
            pack, _ = packed.kernel_ops(x.device)
            x = pack(tokens, masks, pos=self.pos_embed[0])[0].to(tokens.dtype)
            layout = packed.PackedLayout.uniform(B, [m.size(1) for m in masks])
        x = run_blocks_packed(self.blocks, x, layout, compiled=self.compiled,
                              activation_checkpointing=self.activation_checkpointing)
        x = self.norm(x)
        return x.view(B, N, D) if masks is None else x

    def _check_clips(self, x: torch.Tensor) -> None:
        expected = (3, self.num_frames, self.img_size, self.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"encoder expects clips [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
