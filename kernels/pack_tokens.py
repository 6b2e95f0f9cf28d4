"""Fused gather of every mask's tokens (plus position embedding) into one packed [rows, D] matrix.

The fast path runs the context encoder once over all masks' tokens as variable-length sequences; this op builds
that input (and its cu_seqlens) in one launch, and its backward sums each token's gradient over the masks that
picked it, writing every row of grad x (zeros for unpicked tokens) without atomics on the data.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import acc_dtype, check_tensor, pack_indices, packed_rows, row_tile


def pack_tokens_reference(x, idx_list, pos=None):
    """Plain PyTorch: cat over masks of x[b, idx[b]] (+ pos[idx[b]]) rows, and the int32 cu_seqlens."""
    batch, _, dim = x.shape
    rows = torch.arange(batch, device=x.device)[:, None]
    packed = []
    for idx in idx_list:
        tokens = x[rows, idx]
        if pos is not None:
            tokens = tokens + pos[idx]
        packed.append(tokens.reshape(-1, dim))
    lengths = torch.cat([torch.full((batch,), idx.shape[1], dtype=torch.int32, device=x.device) for idx in idx_list])
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return torch.cat(packed), cu_seqlens


@triton.jit
def _pack_fwd_kernel(x_ptr, pos_ptr, idx_ptr, cu_ptr, out_ptr, head_ptr, next_ptr, B, N, D,
                     HAS_POS: tl.constexpr, LINK: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)  # mask * B + sample
    rows, row_mask, tok, src = packed_rows(cu_ptr, idx_ptr, B, N, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols < D)[None, :]
    val = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask).to(ACC)
    if HAS_POS:
        val += tl.load(pos_ptr + tok[:, None] * D + cols[None, :], mask=mask).to(ACC)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)
    if LINK:
        # Per-mask linked lists of the packed rows that read each x row, walked by the backward:
        # head[mask, b*N + n] = last such row, next[row] = the one before it (-1 ends a list).
        if tl.program_id(2) == 0:
            prev = tl.atomic_xchg(head_ptr + (seq // B) * B * N + src, rows, mask=row_mask, sem="relaxed")
            tl.store(next_ptr + rows, prev, mask=row_mask)


@triton.jit
def _pack_bwd_kernel(grad_ptr, head_ptr, next_ptr, grad_x_ptr, grad_pos_ptr, B, N, D,
                     NUM_MASKS: tl.constexpr, B_PER_PROG: tl.constexpr, WRITE_X: tl.constexpr,
                     WRITE_POS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tok_mask = tok < N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = (cols < D)[None, :]
    mask = tok_mask[:, None] & col_mask
    pos_acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
    for bi in range(B_PER_PROG):
        dest = (tl.program_id(2) * B_PER_PROG + bi) * N + tok
        acc = tl.zeros((BLOCK_R, BLOCK_D), ACC)
        for m in range(NUM_MASKS):
            row = tl.load(head_ptr + m * B * N + dest, mask=tok_mask, other=-1)
            while tl.max(row, axis=0) >= 0:
                live = row >= 0
                acc += tl.load(grad_ptr + row.to(tl.int64)[:, None] * D + cols[None, :],
                               mask=live[:, None] & col_mask, other=0).to(ACC)
                row = tl.load(next_ptr + row, mask=live, other=-1)
        if WRITE_X:
            tl.store(grad_x_ptr + dest.to(tl.int64)[:, None] * D + cols[None, :],
                     acc.to(grad_x_ptr.dtype.element_ty), mask=mask)
        if WRITE_POS:
            pos_acc += acc
    if WRITE_POS:
        tl.store(grad_pos_ptr + tok[:, None] * D + cols[None, :], pos_acc.to(grad_pos_ptr.dtype.element_ty), mask=mask)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, flat_idx, cu_seqlens, num_masks, max_k, link):
        batch, n, dim = x.shape
        rows = flat_idx.numel()
        out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
        out = torch.empty(rows, dim, dtype=out_dtype, device=x.device)
        head = torch.full((num_masks * batch * n,), -1, dtype=torch.int32, device=x.device) if link else None
        nxt = torch.empty(rows, dtype=torch.int32, device=x.device) if link else None
        block_r, block_d, num_warps = row_tile(dim)
        grid = (num_masks * batch, triton.cdiv(max_k, block_r), triton.cdiv(dim, block_d))
        _pack_fwd_kernel[grid](
            x, pos, flat_idx, cu_seqlens, out, head, nxt, batch, n, dim,
            HAS_POS=pos is not None, LINK=link, ACC=acc_dtype(out_dtype),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
        ctx.save_for_backward(head, nxt)
        ctx.meta = (x.shape, x.dtype, None if pos is None else pos.dtype, num_masks)
        return out

    @staticmethod
    def backward(ctx, grad):
        head, nxt = ctx.saved_tensors
        (batch, n, dim), x_dtype, pos_dtype, num_masks = ctx.meta
        write_x, write_pos = ctx.needs_input_grad[:2]
        grad = grad.contiguous()
        grad_x = torch.empty(batch, n, dim, dtype=x_dtype, device=grad.device) if write_x else None
        grad_pos = torch.empty(n, dim, dtype=pos_dtype, device=grad.device) if write_pos else None
        # grad pos[n] sums grad x[b, n] over b, so with it one program walks every sample of its tokens.
        b_per_prog = batch if write_pos else 1
        block_r, block_d, num_warps = row_tile(dim)
        grid = (triton.cdiv(n, block_r), triton.cdiv(dim, block_d), batch // b_per_prog)
        _pack_bwd_kernel[grid](
            grad, head, nxt, grad_x, grad_pos, batch, n, dim,
            NUM_MASKS=num_masks, B_PER_PROG=b_per_prog, WRITE_X=write_x, WRITE_POS=write_pos, ACC=acc_dtype(grad.dtype),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
        return grad_x, grad_pos, None, None, None, None, None


def pack_tokens(x, idx_list, pos=None):
    """Pack every mask's tokens into one [sum_i B*K_i, D] matrix (row order: mask, sample, index).

    x: [B, N, D]; idx_list: int64 [B, K_i] per mask, entries in [0, N) (not checked: that would synchronise);
    pos: optional [N, D] added to each gathered row (output dtype is the promotion of x's and pos's).
    Returns (packed, cu_seqlens) with cu_seqlens int32 [len(idx_list) * B + 1] as flash-attention varlen expects.
    The backward accumulates over repeated indices (across or within masks) into x and pos.
    """
    fn = "pack_tokens"
    check_tensor(fn, "x", x, ndim=3)
    batch, n, dim = x.shape
    if pos is not None:
        check_tensor(fn, "pos", pos, ndim=2, device=x.device)
        if tuple(pos.shape) != (n, dim):
            raise ValueError(f"{fn}: pos has shape {list(pos.shape)}, expected [N={n}, D={dim}] to match x")
    flat_idx, cu_seqlens, ks = pack_indices(fn, idx_list, batch, x.device)
    # The backward's linked lists are built only when a backward can happen.
    link = torch.is_grad_enabled() and (x.requires_grad or (pos is not None and pos.requires_grad))
    packed = _GatherTokens.apply(x.contiguous(), None if pos is None else pos.contiguous(), flat_idx, cu_seqlens,
                                 len(ks), max(ks), link)
    return packed, cu_seqlens
