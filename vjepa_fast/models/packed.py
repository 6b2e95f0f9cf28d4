"""Transformer blocks over packed token matrices: many sequences of different lengths in one [T, C] tensor.

The fast path packs both masks' token sets into one matrix. Every layer but attention is row-wise, so it runs
once over all rows (and is what torch.compile sees, with a dynamic row count); attention runs per sequence:
`torch.nn.attention.varlen` on CUDA where present, else dense SDPA over each group of equal-length sequences
(the masks cut every sample of a mask to the same length, so there is no padding at all), or the eager math.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import kernels

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch builds without variable-length attention
    varlen_attn = None


ATTENTION_BACKENDS = ("sdpa", "xformers", "eager")  # sdpa (SDPA / varlen), xformers, eager (plain math)


class KernelOps(NamedTuple):
    pack_tokens: Callable
    masked_l1_loss: Callable
    rope: Callable


def kernel_ops(device: torch.device) -> KernelOps:
    """The fast path's fused ops: the Triton kernels where they run (CUDA, or the Triton interpreter), their
    PyTorch references elsewhere."""
    if kernels.runs_on(device):
        return KernelOps(kernels.pack_tokens, kernels.masked_l1_loss, kernels.rope)
    return KernelOps(kernels.pack_tokens_reference, kernels.masked_l1_loss_reference, kernels.rope_reference)


@dataclass(frozen=True)
class PackedLayout:
    """Consecutive groups of `count` sequences of `length` rows each, packed row after row."""

    groups: tuple[tuple[int, int], ...]  # (count, length)

    @property
    def max_length(self) -> int:
        return max(n for _, n in self.groups)

    def cu_seqlens(self, device) -> torch.Tensor:
        """int32 [num_sequences + 1] row offsets, made once per (layout, device)."""
        return _cu_seqlens(self, torch.device(device))


@functools.lru_cache(maxsize=64)
def _cu_seqlens(layout: PackedLayout, device: torch.device) -> torch.Tensor:
    return kernels.cu_seqlens_of([length for count, length in layout.groups for _ in range(count)], device)


def check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (choose {', '.join(ATTENTION_BACKENDS)})")


def attend_dense(q, k, v, backend: str):
    """q, k, v [S, H, L, hd] -> [S, H, L, hd]: the plain math ("eager") or SDPA (flash / cuDNN on GPU)."""
    check_backend(backend)
    if backend == "eager":
        return (q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def packed_attention(qkv: torch.Tensor, layout: PackedLayout, num_heads: int, backend: str,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention within each sequence of a packed [T, 3C] qkv matrix -> [T, C]; with `positions` ([T, 3]
    grid positions of the rows), queries and keys are rotated by 3D RoPE first (one fused kernel each).

    One group of equal-length sequences (a dense full-clip pass) always takes dense SDPA (flash / cuDNN on GPU).
    """
    T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.view(T, 3, num_heads, C // num_heads).unbind(1)  # [T, H, hd] views
    if positions is not None:  # queries and keys rotated in one launch: [T, 2H, hd] with the heads of both
        qk = kernel_ops(qkv.device).rope(qkv.view(T, 3 * num_heads, -1)[:, :2 * num_heads], positions)
        q, k = qk[:, :num_heads], qk[:, num_heads:]
    check_backend(backend)
    if backend != "eager" and len(layout.groups) > 1:
        if backend == "xformers":
            return _xformers_attention(q, k, v, layout).reshape(T, C)
        if qkv.is_cuda and varlen_attn is not None and qkv.dtype in (torch.float16, torch.bfloat16):
            cu = layout.cu_seqlens(qkv.device)
            n = layout.max_length
            return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, n, n).reshape(T, C)
    outs, start = [], 0
    for count, length in layout.groups:
        rows = count * length
        q_, k_, v_ = (t[start:start + rows].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        outs.append(attend_dense(q_, k_, v_, backend).transpose(1, 2).reshape(rows, C))
        start += rows
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _xformers_attention(q, k, v, layout: PackedLayout) -> torch.Tensor:
    """One xformers memory-efficient attention call over all sequences with a block-diagonal mask (GPU only)."""
    try:
        from xformers.ops import fmha
    except ImportError as e:
        raise RuntimeError("model.attn_backend=xformers needs the xformers package (pip install xformers)") from e
    bias = _block_diagonal(fmha, layout)
    return fmha.memory_efficient_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias)[0]


@functools.lru_cache(maxsize=64)
def _block_diagonal(fmha, layout: PackedLayout):
    return fmha.attn_bias.BlockDiagonalMask.from_seqlens([n for c, n in layout.groups for _ in range(c)])


# ---- the row-wise halves of a block, as plain functions of tensors (what torch.compile compiles) --------------

def attn_in(x, ln_w, ln_b, qkv_w, qkv_b, eps: float):
    """norm1 + qkv projection."""
    return F.linear(F.layer_norm(x, (x.size(-1),), ln_w, ln_b, eps), qkv_w, qkv_b)


def attn_out_mlp(x, attn, proj_w, proj_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps: float):
    """Attention output projection + residual, then norm2 + MLP (exact GELU) + residual."""
    x = x + F.linear(attn, proj_w, proj_b)
    h = F.gelu(F.linear(F.layer_norm(x, (x.size(-1),), ln_w, ln_b, eps), fc1_w, fc1_b))
    return x + F.linear(h, fc2_w, fc2_b)


@functools.cache
def compiled_rowwise():
    """(attn_in, attn_out_mlp) compiled once for every block: weights are inputs, the row count is dynamic."""
    return (torch.compile(attn_in, dynamic=True), torch.compile(attn_out_mlp, dynamic=True))
