"""Video ViT encoder (docs/design.md, section 4): 3D patch embed, fixed sin-cos positions (V-JEPA) or 3D rotary
positions in every attention (V-JEPA 2, `use_rope`), pre-norm blocks.

Parameter names follow the official V-JEPA code, so official checkpoints load after stripping their
`module.` / `backbone.` prefixes.
"""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from . import packed
from .pos_embed import sincos_3d

LN_EPS = 1e-6
INIT_STD = 0.02


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx int64 [B, K] -> x[b, idx[b]] as [B, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class Attention(nn.Module):
    """Multi-head self-attention; `backend` "eager" is the plain math, any other uses F.scaled_dot_product_attention
    on these dense sequences (the backends differ on packed sequences, see packed.py). With `positions` ([B * N, 3]
    grid positions, sample-major), queries and keys are rotated by 3D RoPE first (kernels.rope_reference: the
    official math)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if positions is not None:
            q, k = (_rotate_dense(t, positions) for t in (q, k))
        out = packed.attend_dense(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def _rotate_dense(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE of [B, H, N, hd] queries or keys at [B * N, 3] positions (sample-major)."""
    B, H, N, hd = t.shape
    rows = kernels.rope_reference(t.transpose(1, 2).reshape(B * N, H, hd), positions.reshape(B * N, 3))
    return rows.view(B, N, H, hd).transpose(1, 2)


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

    def forward(self, x, positions: torch.Tensor | None = None):
        x = x + self.attn(self.norm1(x), positions)
        return x + self.mlp(self.norm2(x))

    def forward_packed(self, x: torch.Tensor, layout: packed.PackedLayout, compiled: bool = False,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """The same block over a packed [T, C] matrix of sequences described by `layout` (`positions`: [T, 3] grid
        positions of the rows, for RoPE)."""
        attn_in, attn_out_mlp = packed.compiled_rowwise() if compiled else (packed.attn_in, packed.attn_out_mlp)
        qkv = attn_in(x, self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias, LN_EPS)
        a = packed.packed_attention(qkv, layout, self.attn.num_heads, self.attn.backend, positions)
        return attn_out_mlp(x, a, self.attn.proj.weight, self.attn.proj.bias, self.norm2.weight, self.norm2.bias,
                            self.mlp.fc1.weight, self.mlp.fc1.bias, self.mlp.fc2.weight, self.mlp.fc2.bias, LN_EPS)


def run_blocks_packed(blocks: nn.ModuleList, x: torch.Tensor, layout: packed.PackedLayout, *,
                      compiled: bool = False, activation_checkpointing: bool = False,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """Run `blocks` over a packed matrix; with activation checkpointing each block's activations are recomputed
    in the backward instead of stored."""
    for blk in blocks:
        if activation_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk.forward_packed, x, layout, compiled, positions, use_reentrant=False)
        else:
            x = blk.forward_packed(x, layout, compiled, positions)
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
    """The V-JEPA video encoder. forward(x, mask=None): all tokens, or only those at `mask` [B, K] indices.

    A sin-cos encoder takes clips of its `num_frames` x `img_size` (its table's grid). A RoPE encoder, as the
    official one, takes clips of any size and length: positions come from the clip's grid of patches (frames and
    pixels past the last whole tubelet and patch are dropped by the patch embedding, as there)."""

    def __init__(self, *, img_size: int = 224, num_frames: int = 16, patch_size: int = 16, tubelet_size: int = 2,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 uniform_power: bool = True, attn_backend: str = "sdpa", use_rope: bool = False):
        super().__init__()
        self.img_size, self.num_frames = img_size, num_frames
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.grid_depth, self.grid_size = num_frames // tubelet_size, img_size // patch_size
        self.num_patches = self.grid_depth * self.grid_size ** 2
        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, embed_dim)
        self.use_rope = use_rope
        self.pos_embed = None  # with RoPE, positions rotate queries and keys instead: no table, none in checkpoints
        if not use_rope:
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

    def forward(self, x: torch.Tensor | list[torch.Tensor], masks=None, computation: str = "reference"):
        """Features of clips x [B, 3, T, H, W].

        masks None: all tokens [B, N, D]. One int64 [B, K] mask: the kept tokens [B, K, D]. A list of masks:
        reference computation, one pass per mask (as the official multi-mask wrapper) -> list of [B, K_i, D]; fast
        computation, one patch embedding, one fused packing of every mask's tokens and one pass over them ->
        [sum_i B*K_i, D] (order: mask, sample, index). The fast computation also takes clips of several lengths
        (RoPE models): x a list of clip tensors, masks None or one list of masks per clip tensor, all in one pass
        -> a list of [B_g, N_g, D], or the rows of every group's masks packed in (group, mask, sample, index)
        order. Everything goes through forward() so that DDP / FSDP wrappers see it.
        """
        several = isinstance(x, (list, tuple))
        groups = list(x) if several else [x]
        for clips in groups:
            self._check_clips(clips)
        if several and masks is not None and (len(masks) != len(groups) or any(m is None for m in masks)):
            raise ValueError(f"clips of {len(groups)} lengths take masks=None or a list of masks for each, got "
                             f"{len(masks)} entries, {sum(m is None for m in masks)} of them None")
        if computation == "fast":
            group_masks = (masks if masks is not None else [None] * len(groups)) if several else [masks]
            return self._forward_fast(groups, group_masks, single=not several)
        if several:
            raise ValueError("clips of several lengths go through the fast computation only (the reference "
                             "computation runs one group at a time)")
        if isinstance(masks, (list, tuple)):
            return [self._forward_reference(x, m) for m in masks]
        return self._forward_reference(x, masks)

    def positions(self, token_ids: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
        """The (t, h, w) grid positions [numel, 3] of token ids of any shape, flattened in order (ids number the
        tokens t-major, then row, then column), for RoPE: on the patch grid of `clips`, whatever their size."""
        rows, cols = (n // self.patch_size for n in clips.shape[-2:])
        return kernels.grid_positions(token_ids, rows, cols)

    def _forward_reference(self, clips: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.patch_embed(clips)
        if self.pos_embed is not None:
            x = (x + self.pos_embed).to(x.dtype)  # as the official in-place add: low precision under autocast
        if mask is not None:
            x = gather_tokens(x, mask)
        positions = None
        if self.use_rope:
            ids = mask if mask is not None else torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)
            positions = self.positions(ids, clips)
        for blk in self.blocks:
            x = blk(x, positions)
        return self.norm(x)

    def _forward_fast(self, groups: list[torch.Tensor], group_masks: list, single: bool):
        """One pass over every group's sequences: all tokens of each clip (masks None), or each mask's tokens."""
        rows, layout, positions, shapes = [], [], [], []
        full = group_masks[0] is None
        for clips, masks in zip(groups, group_masks):
            tokens = self.patch_embed(clips)
            B, N, D = tokens.shape
            shapes.append((B, N, D))
            if full:  # every token of a clip as one sequence
                x = tokens if self.pos_embed is None else (tokens + self.pos_embed).to(tokens.dtype)
                rows.append(x.reshape(B * N, D))
                layout.append((B, N))
                if self.use_rope:
                    positions.append(self.positions(torch.arange(N, device=x.device).repeat(B), clips))
            else:
                masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
                pos = None if self.pos_embed is None else self.pos_embed[0]
                rows.append(packed.kernel_ops(clips.device).pack_tokens(tokens, masks, pos=pos)[0].to(tokens.dtype))
                layout += [(B, m.size(1)) for m in masks]
                if self.use_rope:
                    positions += [self.positions(m, clips) for m in masks]  # the packed rows' tokens
        x = run_blocks_packed(self.blocks, torch.cat(rows) if len(rows) > 1 else rows[0],
                              packed.PackedLayout(tuple(layout)), compiled=self.compiled,
                              activation_checkpointing=self.activation_checkpointing,
                              positions=torch.cat(positions) if self.use_rope else None)
        x = self.norm(x)
        if not full:
            return x
        out = [part.view(*shape) for part, shape in zip(x.split([B * N for B, N, _ in shapes]), shapes)]
        return out[0] if single else out

    def _check_clips(self, x: torch.Tensor) -> None:
        if self.use_rope:  # any size, as the official encoder: positions rotate, there is no table to match
            ok = x.dim() == 5 and x.shape[1] == 3 and x.shape[2] >= self.tubelet_size and \
                min(x.shape[3:]) >= self.patch_size
            expected = f"3, T >= {self.tubelet_size}, H >= {self.patch_size}, W >= {self.patch_size}"
        else:
            ok = x.dim() == 5 and tuple(x.shape[1:]) == (3, self.num_frames, self.img_size, self.img_size)
            expected = f"3, {self.num_frames}, {self.img_size}, {self.img_size}"
        if not ok:
            raise ValueError(f"encoder expects clips [B, {expected}], got {list(x.shape)}")
