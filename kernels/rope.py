"""V-JEPA 2's 3D rotary position embedding (RoPE) of attention queries or keys, in one launch per tensor.

The head dim hd is split into three slices of d = 2 * ((hd // 3) // 2) elements, rotated with the token's t, h and w
grid positions; the last hd - 3d elements are copied. Within a slice of length d (half = d // 2) element j turns by
theta_j = p * omega_(j mod half), omega_k = 1 / 10000 ** (k / half), and adjacent elements (2i, 2i+1) mix:

    out[2i]   = x[2i]   * cos(theta_2i)   - x[2i+1] * sin(theta_2i)
    out[2i+1] = x[2i+1] * cos(theta_2i+1) + x[2i]   * sin(theta_2i+1)

The frequencies are tiled ([w0 .. w_half-1, w0 .. w_half-1]) rather than repeated per pair, so the two elements of
a pair turn by different angles and the map is not a rotation. That is a known quirk of the official code, kept
because the pretrained checkpoints were trained with it. The map is linear in x, so its backward is the same kernel
with the transposed 2x2 blocks.

Precision follows the official attention (RoPEAttention, integer positions): omega, the angles, their sin and cos
and the products are computed in x's dtype, so under bf16 autocast each of them is rounded to bf16 (angles of
large positions are coarse, and the released weights were trained with them; even the base 10000 is rounded
first, to 9984). The kernel computes each step in fp32 (fp64 for fp64 x) and rounds it to x's dtype where torch
would, so it matches the official computation bit for bit but for the last bit of a sin or cos.

Kernel: a program takes BLOCK_R rows x the head dim and up to 8 heads. The angles depend only on the row and the
element index, so their cos and sin are computed once (from pos, no tables in memory) and reused for each head; each
pair's partner is swapped in registers, so every element is loaded once and stored once.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_tensor, row_tile

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}
# log2 of the base 10000 as torch's `10000 ** omega` uses it: converted to omega's dtype first (bf16: 9984).
_LOG2_BASE = {dtype: math.log2(torch.tensor(10000.0, dtype=dtype).item()) for dtype in _TL_DTYPES}
# Heads one program rotates with the same cos and sin tiles: amortises the transcendentals (per element they would
# cost more instructions than the element's memory traffic takes) while leaving cdiv(heads, 8) programs per row tile.
_HEADS_PER_PROG = 8


def axis_dim(hd):
    """d: the elements of the head dim rotated per grid axis, 2 * ((hd // 3) // 2); hd - 3d trailing ones are copied."""
    return 2 * ((hd // 3) // 2)


def _rotate_axis_reference(x, pos):
    """The official rotation of one axis slice, op for op and dtype for dtype: x [rows, heads, D], pos [rows]
    integer (so the angles are in x's dtype)."""
    dim = x.shape[-1]
    omega = torch.arange(dim // 2, dtype=x.dtype, device=x.device)  # in x's dtype, as the official code
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    freq = torch.einsum("..., f -> ... f", pos, omega)  # [rows, D/2]
    # Tiled, not interleaved: element j uses omega_(j mod D/2) (the checkpoint-compatible quirk).
    sin = freq.sin().repeat(1, 2)[:, None]  # [rows, 1, D], broadcast over heads
    cos = freq.cos().repeat(1, 2)[:, None]
    swapped = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)  # (-x[2i+1], x[2i]) per pair
    return x * cos + swapped * sin


def rope_reference(x, pos):
    """Plain PyTorch, the same torch ops in the same dtypes as the official V-JEPA 2 attention (so torch.autocast
    treats it alike): x [rows, heads, hd] float, pos [rows, 3] integer (t, h, w) positions. The result has x's
    dtype. Autograd by construction.
    """
    d = axis_dim(x.shape[-1])
    parts = [_rotate_axis_reference(x[..., a * d:(a + 1) * d], pos[:, a]) for a in range(3)]
    if 3 * d < x.shape[-1]:
        parts.append(x[..., 3 * d:])
    return torch.cat(parts, dim=-1)


@triton.jit
def _div_rn(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest, as torch divides (Triton's fp32 `/` is approximate on the GPU; fp64's is exact)."""
    if ACC == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _rnd(v, ACC: tl.constexpr, ROUND: tl.constexpr):
    """v (in ACC) rounded to nearest-even in ROUND, x's dtype, as a torch op in that dtype rounds its result;
    nothing when ROUND is ACC. bf16 by bits: the interpreter's fp32 -> bf16 conversion truncates."""
    if ROUND == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif ROUND != ACC:
        return v.to(ROUND).to(ACC)
    else:
        return v


@triton.jit
def _omega(k, HALF: tl.constexpr, ACC: tl.constexpr, ROUND: tl.constexpr, LOG2_BASE: tl.constexpr):
    """omega_k = 1 / base ** (k / HALF) for a vector of k, rounded step by step as torch computes it in ROUND
    (the power is evaluated in fp64 and rounded once, like a correctly rounded pow)."""
    e = _rnd(_div_rn(k.to(ACC), tl.full(k.shape, HALF, ACC), ACC), ACC, ROUND)
    power = _rnd(tl.exp2(e.to(tl.float64) * tl.full(k.shape, LOG2_BASE, tl.float64)).to(ACC), ACC, ROUND)
    return _rnd(_div_rn(tl.full(k.shape, 1.0, ACC), power, ACC), ACC, ROUND)


@triton.jit
def _cos_sin(p, k, HALF: tl.constexpr, ACC: tl.constexpr, ROUND: tl.constexpr, LOG2_BASE: tl.constexpr):
    """cos and sin of the angles p * omega_k, each step rounded as in torch."""
    angle = _rnd(p * _omega(k, HALF, ACC, ROUND, LOG2_BASE)[None, :], ACC, ROUND)
    return _rnd(tl.cos(angle), ACC, ROUND), _rnd(tl.sin(angle), ACC, ROUND)


# Row counts change every step (the masks' lengths): not specialised on, so they never cost a recompilation.
@triton.jit(do_not_specialize=["rows", "heads", "stride_pr", "stride_pa"])
def _rope_kernel(x_ptr, pos_ptr, out_ptr, rows, heads, stride_xr, stride_xh, stride_pr, stride_pa,
                 HD: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, TRANSPOSE: tl.constexpr, ACC: tl.constexpr,
                 ROUND: tl.constexpr, LOG2_BASE: tl.constexpr, HEADS_PACKED: tl.constexpr,
                 HEADS_PER_PROG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    # Program: BLOCK_R rows x the head dim (BLOCK_J >= HD) x HEADS_PER_PROG heads, one head at a time. The angles
    # depend on the row and j only, so cos and sin are computed once per program and reused for every head.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_J)
    row_mask = r < rows
    mask = row_mask[:, None] & (j < HD)[None, :]
    if D > 0:  # head dims below 6 rotate nothing
        axis = j // D  # 0: t, 1: h, 2: w, 3 and more: the copied tail
        i = j - axis * D  # index within the axis slice; its parity is j's (slices start at even j)
        odd = i % 2
        rotated = (axis < 3)[None, :]
        pos_row = pos_ptr + r * stride_pr
        pt = tl.load(pos_row, mask=row_mask, other=0).to(ACC)[:, None]
        ph = tl.load(pos_row + stride_pa, mask=row_mask, other=0).to(ACC)[:, None]
        pw = tl.load(pos_row + 2 * stride_pa, mask=row_mask, other=0).to(ACC)[:, None]
        p = tl.where(axis[None, :] == 0, pt, tl.where(axis[None, :] == 1, ph, pw))
        # out[j] = x[j] cos_j + x[j ^ 1] sin_j with, forward, cos_j = cos(theta_j), sin_j = -+sin(theta_j) (- for
        # even j); transposed (the backward, R^T), sin_j = +-sin(theta_(j ^ 1)).
        k = i % HALF
        cos, sin = _cos_sin(p, k, HALF, ACC, ROUND, LOG2_BASE)
        if TRANSPOSE:
            _, sin = _cos_sin(p, (i ^ 1) % HALF, HALF, ACC, ROUND, LOG2_BASE)
            sign = 1 - 2 * odd
        else:
            sign = 2 * odd - 1
        sin = sign.to(ACC)[None, :] * sin
    src = x_ptr + r.to(tl.int64)[:, None] * stride_xr + j[None, :]
    dst = out_ptr + r.to(tl.int64)[:, None] * (heads * HD) + j[None, :]
    for hh in range(HEADS_PER_PROG):
        h = tl.program_id(1) * HEADS_PER_PROG + hh
        # h compared as a block: the interpreter widens a scalar comparison splatted into a block to int32, and
        # Triton >= 3.9's interpreter refuses a load mask that is not bool.
        head_mask = mask & (tl.full((BLOCK_R, 1), h, tl.int32) < heads)
        # A constant head stride tells the compiler the alignment (vector loads for hd = 88 too).
        head_offset = h.to(tl.int64) * (HD if HEADS_PACKED else stride_xh)
        val = tl.load(src + head_offset, mask=head_mask, other=0).to(ACC)
        if D > 0:
            # x[j ^ 1] by swapping the two halves of each pair in registers (pairs never straddle the tile).
            even, odd_val = tl.split(tl.reshape(val, (BLOCK_R, BLOCK_J // 2, 2)))
            partner = tl.reshape(tl.join(odd_val, even), (BLOCK_R, BLOCK_J))
            turned = _rnd(_rnd(val * cos, ACC, ROUND) + _rnd(partner * sin, ACC, ROUND), ACC, ROUND)
            val = tl.where(rotated, turned, val)
        tl.store(dst + h * HD, val.to(out_ptr.dtype.element_ty), mask=head_mask)


def _launch(x, pos, transpose):
    """R x (transpose False) or R^T x into a new contiguous tensor of x's shape and dtype."""
    rows, heads, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, heads, hd, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    d = axis_dim(hd)
    # 4096-element tiles (BLOCK_J = hd rounded up to a power of two) at 8 warps: 16 elements a thread, as the cos
    # and sin tiles stay in registers across the head loop (~110 registers a thread; ~210 at 4 warps).
    block_r, block_j, _ = row_tile(hd, whole_row=True)
    num_warps = 8
    heads_per_prog = min(heads, _HEADS_PER_PROG)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(heads, heads_per_prog))
    _rope_kernel[grid](
        x, pos, out, rows, heads, x.stride(0), x.stride(1), pos.stride(0), pos.stride(1),
        HD=hd, D=d, HALF=max(d // 2, 1), TRANSPOSE=transpose, ACC=acc_dtype(x.dtype), ROUND=_TL_DTYPES[x.dtype],
        LOG2_BASE=_LOG2_BASE[x.dtype],
        HEADS_PACKED=heads == 1 or x.stride(1) == hd, HEADS_PER_PROG=heads_per_prog, BLOCK_R=block_r,
        BLOCK_J=block_j, num_warps=num_warps)
    return out


class _Rope(torch.autograd.Function):
    """R x, or R^T x when transpose; the gradient of one is the other, so any order of derivative works."""

    @staticmethod
    def forward(ctx, x, pos, transpose):
        ctx.save_for_backward(pos)
        ctx.transpose = transpose
        return _launch(x, pos, transpose)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return _Rope.apply(grad, pos, not ctx.transpose), None, None


def rope(x, pos):
    """V-JEPA 2's 3D RoPE of queries or keys (see the module docstring), one Triton launch; differentiable in x.

    x: [rows, heads, hd] float16/bfloat16/float32/float64, any strides (a last-dim stride other than 1 costs a
    contiguous copy), e.g. the q part of a packed qkv matrix, qkv.view(rows, 3, heads, hd)[:, 0], or q and k at once
    as qkv.view(rows, 3 * heads, hd)[:, :2 * heads]. pos: int32/int64 [rows, 3], the (t, h, w) grid position of each
    row's token (grid_positions). Returns a new contiguous tensor of x's shape and dtype; x is not changed.
    Angles are computed from pos on the fly, each step rounded to x's dtype as the official code's (the module
    docstring); no gradient for pos.
    """
    fn = "rope"
    check_tensor(fn, "x", x, ndim=3)
    check_tensor(fn, "pos", pos, ndim=2, dtypes=(torch.int32, torch.int64), device=x.device)
    rows, _, hd = x.shape
    if hd < 2:
        raise ValueError(f"{fn}: x has shape {list(x.shape)}, expected [rows, heads, hd] with hd >= 2")
    if tuple(pos.shape) != (rows, 3):
        raise ValueError(f"{fn}: pos has shape {list(pos.shape)}, expected [rows={rows}, 3] (t, h, w of each row of x)")
    return _Rope.apply(x, pos, False)


def grid_positions(token_ids, height, width):
    """(t, h, w) grid position of each token id, as int32 [rows, 3] for rope.

    Token ids number a [T, height, width] grid of patches t-major, then row, then column (as the patch embedding
    flattens a clip): id = (t * height + h) * width + w, so t = id // (height * width),
    h = (id % (height * width)) // width, w = id % width. token_ids: integer tensor in [0, T * height * width) of any
    shape, flattened in order (a [B, K] mask gives rows in pack_tokens' order: sample, then index).
    """
    fn = "grid_positions"
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"{fn}: token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: token_ids has dtype {token_ids.dtype}, expected an integer dtype")
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{fn}: {name} must be a positive int, got {size!r}")
    ids = token_ids.reshape(-1)
    in_frame = ids % (height * width)
    return torch.stack((ids // (height * width), in_frame // width, in_frame % width), dim=1).to(torch.int32)
