"""V-JEPA loss fused: layer-norm of the gathered target rows, L1 against the packed predictions, and its backward.

Each program normalises its target rows in registers straight from the raw target-encoder output, so neither the
normalised target [B, N, D] nor the gathered target [rows, D] is ever written. Per-program partial sums are
reduced with torch.sum (deterministic, no atomics).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import acc_dtype, check_tensor, pack_indices, packed_rows, row_tile


def masked_l1_loss_reference(pred, target, idx_list, eps=1e-5, loss_exp=1.0):
    """Plain PyTorch, as the official code: mean over masks of mean(|pred_i - layer_norm(target)[idx_i]|**p) / p."""
    batch, _, dim = target.shape
    norm = F.layer_norm(target, (dim,), eps=eps)
    rows = torch.arange(batch, device=target.device)[:, None]
    preds = pred.split([batch * idx.shape[1] for idx in idx_list])
    losses = [torch.mean(torch.abs(p - norm[rows, idx].reshape(-1, dim)) ** loss_exp) / loss_exp
              for p, idx in zip(preds, idx_list)]
    return sum(losses) / len(losses)


@triton.jit
def _pow(a, p: tl.constexpr):
    """a ** p for a >= 0 and p > 0 (log2 only of positive values: 0 ** p = 0)."""
    return tl.where(a > 0, tl.exp2(p * tl.log2(tl.where(a > 0, a, 1.0))), 0.0)


@triton.jit
def _masked_l1_kernel(pred_ptr, target_ptr, idx_ptr, cu_ptr, partial_ptr, grad_out_ptr, grad_pred_ptr, B, N, D,
                      inv_mbd, eps, P: tl.constexpr, BACKWARD: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)  # mask * B + sample
    rows, row_mask, _, src = packed_rows(cu_ptr, idx_ptr, B, N, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols < D)[None, :]

    tgt = tl.load(target_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
    mean = tl.sum(tgt, axis=1) / D
    centred = tl.where(mask, tgt - mean[:, None], 0)
    rstd = 1 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    pred = tl.load(pred_ptr + offs, mask=mask, other=0).to(ACC)
    diff = tl.where(mask, pred - centred * rstd[:, None], 0)
    adiff = tl.abs(diff)
    # Every row of this sequence belongs to one mask, whose mean divides by B * K * D (and the mean over masks by M).
    weight = inv_mbd / (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(ACC)

    if BACKWARD:
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(ACC)
        if P != 1.0:
            sign *= _pow(adiff, P - 1.0)
        grad = sign * (weight * tl.load(grad_out_ptr).to(ACC))
        tl.store(grad_pred_ptr + offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=mask)
    else:
        if P != 1.0:
            adiff = _pow(adiff, P) / P
        partial = tl.sum(tl.sum(adiff, axis=1), axis=0) * weight
        tl.store(partial_ptr + seq * tl.num_programs(1) + tl.program_id(1), partial)


def _launch(pred, target, flat_idx, cu_seqlens, num_masks, max_k, eps, loss_exp, grad_out=None):
    """Forward (grad_out None): the loss. Backward: grad of pred scaled by the 0-d grad_out."""
    batch, n, dim = target.shape
    block_r, block_d, num_warps = row_tile(dim, whole_row=True)
    grid = (num_masks * batch, triton.cdiv(max_k, block_r))
    acc = acc_dtype(pred.dtype, target.dtype)
    out_dtype = torch.float64 if acc == tl.float64 else torch.float32
    backward = grad_out is not None
    partial = None if backward else torch.empty(grid[0] * grid[1], dtype=out_dtype, device=pred.device)
    grad_pred = torch.empty_like(pred) if backward else None
    _masked_l1_kernel[grid](
        pred, target, flat_idx, cu_seqlens, partial, grad_out, grad_pred, batch, n, dim,
        1.0 / (num_masks * batch * dim), eps, P=float(loss_exp), BACKWARD=backward, ACC=acc,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return grad_pred if backward else partial.sum()


class _MaskedL1Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, flat_idx, cu_seqlens, num_masks, max_k, eps, loss_exp):
        ctx.save_for_backward(pred, target, flat_idx, cu_seqlens)
        ctx.meta = (num_masks, max_k, eps, loss_exp)
        return _launch(pred, target, flat_idx, cu_seqlens, num_masks, max_k, eps, loss_exp)

    @staticmethod
    def backward(ctx, grad_out):
        pred, target, flat_idx, cu_seqlens = ctx.saved_tensors
        grad_pred = _launch(pred, target, flat_idx, cu_seqlens, *ctx.meta, grad_out=grad_out.contiguous())
        return grad_pred, None, None, None, None, None, None, None


def masked_l1_loss(pred, target, idx_list, eps=1e-5, loss_exp=1.0):
    """mean over masks i of mean(|pred_i - layer_norm(target)[b, idx_i[b]]|**p) / p, layer-norm without affine.

    pred: [sum_i B*K_i, D] packed like pack_tokens (mask, sample, index); target: [B, N, D] raw target-encoder
    output (no grad); idx_list: int64 [B, K_i] per mask; loss_exp p >= 1 (the official default 1.0 is L1).
    Accumulates in fp32 (fp64 for fp64 inputs) and returns a 0-d fp32 (fp64) tensor; gradient flows to pred only,
    with sign(0) = 0 as in torch.
    """
    fn = "masked_l1_loss"
    check_tensor(fn, "target", target, ndim=3)
    check_tensor(fn, "pred", pred, ndim=2, device=target.device)
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: target requires grad; it is the target encoder's output and gets none (detach it)")
    if not loss_exp >= 1.0:
        raise ValueError(f"{fn}: loss_exp must be >= 1, got {loss_exp}")
    batch, _, dim = target.shape
    flat_idx, cu_seqlens, ks = pack_indices(fn, idx_list, batch, target.device)
    if tuple(pred.shape) != (flat_idx.numel(), dim):
        raise ValueError(f"{fn}: pred has shape {list(pred.shape)}, expected [sum_i B*K_i={flat_idx.numel()}, "
                         f"D={dim}] for target {list(target.shape)} and masks of K={ks}")
    return _MaskedL1Loss.apply(pred.contiguous(), target.contiguous(), flat_idx, cu_seqlens, len(ks), max(ks),
                               float(eps), float(loss_exp))
