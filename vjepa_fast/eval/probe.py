"""Probes on frozen tokens [B, N, D] -> logits [B, classes]: the paper's attentive probe and a linear probe.

The attentive probe is the official AttentiveClassifier (paper appendix B): one learnable query cross-attends to
the layer-normed tokens (keys/values; heads = the encoder's), a residual MLP (ratio 4) refines it, and a linear
layer classifies it. The cross-attention has no output projection: the official V-JEPA 1 module defines one but
never applies it (V-JEPA 2 dropped it). V-JEPA 2's 4-block probe (depth 4) runs three self-attention blocks over
all tokens first. The linear probe (ours, not an official protocol) classifies the mean token; its features are
standardised by a BatchNorm without affine (as MAE's linear probe), which keeps it linear and scale-free.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vit import INIT_STD, MLP, Block

PROBES = ("attentive", "linear")
LN_EPS = 1e-5  # the official pooler's nn.LayerNorm default


class CrossAttention(nn.Module):
    """Queries [B, Q, D] attend to tokens [B, N, D]: q from the queries, k and v from the tokens; the heads'
    outputs are concatenated without a projection, as the official module computes."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"the probe's heads ({num_heads}) must divide the feature dim {dim}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, Q, D = queries.shape
        N, H = tokens.size(1), self.num_heads
        q = self.q(queries).reshape(B, Q, H, D // H).transpose(1, 2)
        k, v = self.kv(tokens).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, Q, D)


class AttentiveProbe(nn.Module):
    """tokens -> (depth-1 self-attention blocks over all tokens, V-JEPA 2) -> learnable query q ->
    [q + xattn(q, norm1(tokens)); q + mlp(norm2(q))] -> linear classifier. Official init: trunc-normal(0.02)
    weights and query, zero biases; block l's attn.proj and mlp.fc2 divided by sqrt(2l), the cross-attention
    block's mlp.fc2 by sqrt(2 max(1, depth-1)) (V-JEPA 2's rescaling, the same as V-JEPA 1's at depth 1)."""

    def __init__(self, dim: int, num_heads: int, num_classes: int, mlp_ratio: float = 4.0, depth: int = 1):
        super().__init__()
        if depth < 1:
            raise ValueError(f"probe depth must be >= 1, got {depth}")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.xattn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth - 1))
        for m in self.blocks.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = LN_EPS  # the official pooler's blocks use nn.LayerNorm's default, the encoder's 1e-6
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.query, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for layer_id, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
            self.mlp.fc2.weight.div_(math.sqrt(2.0 * max(1, len(self.blocks))))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        q = self.query.expand(tokens.size(0), -1, -1)
        q = q + self.xattn(q, self.norm1(tokens))
        q = q + self.mlp(self.norm2(q))
        return self.head(q.squeeze(1))


class LinearProbe(nn.Module):
    """Mean over tokens -> per-dim standardisation (BatchNorm, no affine) -> linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.mean(dim=1)
        if self.training and len(x) == 1:  # a last batch of one (the loaders keep it) has no batch statistics
            return self.head(F.batch_norm(x, self.norm.running_mean, self.norm.running_var, eps=self.norm.eps))
        return self.head(self.norm(x))


def build_probe(name: str, dim: int, num_heads: int, num_classes: int, depth: int = 1) -> nn.Module:
    """The probe `name` ("attentive" or "linear") for features of width `dim` from an encoder of `num_heads`
    (`depth`: the attentive probe's blocks, 1 for V-JEPA 1, 4 for V-JEPA 2)."""
    if name == "attentive":
        return AttentiveProbe(dim, num_heads, num_classes, depth=depth)
    if name == "linear":
        return LinearProbe(dim, num_classes)
    raise ValueError(f"unknown probe {name!r}; choose one of {', '.join(PROBES)}")
