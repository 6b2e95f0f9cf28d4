"""Input checks, index packing and launch sizes shared by the Triton kernels."""
import itertools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def runs_on(device) -> bool:
    """Whether the kernels take tensors on `device`: CUDA, or the CPU under the Triton interpreter
    (TRITON_INTERPRET=1). Where they do not, callers use the PyTorch references."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and bool(INTERPRET))


def check_tensor(fn, name, t, *, ndim=None, dtypes=FLOAT_DTYPES, device=None):
    """Raise a TypeError/ValueError/RuntimeError naming `fn`, `name` and the offending shape, dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {list(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (the device of the first input)")
    if not runs_on(t.device):
        raise RuntimeError(
            f"{fn}: {name} is on {t.device}; the Triton kernels run on CUDA tensors, or on CPU tensors only when "
            f"TRITON_INTERPRET=1 is set before triton is imported (use {fn}_reference otherwise)")


@triton.jit
def packed_rows(cu_ptr, idx_ptr, B, N, BLOCK_R: tl.constexpr):
    """This program's tile of one packed sequence (program axis 0 = mask * B + sample, axis 1 = row tile): the
    packed row numbers, which of them exist, their token indices, and their flat source rows b * N + token."""
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq)
    end = tl.load(cu_ptr + seq + 1)
    rows = start + tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < end
    tok = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    return rows, row_mask, tok, (seq % B) * N + tok


# Whether triton.jit made interpreted kernels (TRITON_INTERPRET was on when triton was imported): those run on CPU
# tensors. Asked of a kernel rather than of the environment, as each Triton version spells the switch its own way.
INTERPRET = isinstance(packed_rows, InterpretedFunction)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: through pinned memory with a non-blocking copy
    (a copy from pageable memory can stall until the device's queue drains)."""
    device = torch.device(device)
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def cu_seqlens_of(lengths, device) -> torch.Tensor:
    """int32 [len(lengths) + 1] row offsets of consecutive sequences of `lengths` rows, on `device` without a host
    wait (varlen attention's and the packed kernels' cu_seqlens)."""
    return to_device(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), device)


def pack_indices(fn, idx_list, batch, device):
    """Check `idx_list` (int64 [batch, K_i] per mask) and return the packed-row index table and cu_seqlens.

    Packed row order is mask, then sample, then index; sequence j = mask * batch + sample. Both tensors are built
    from host metadata (shapes) and device data only, so nothing waits for the device.
    """
    if not isinstance(idx_list, (list, tuple)) or len(idx_list) == 0:
        got = type(idx_list).__name__ + (" of length 0" if isinstance(idx_list, (list, tuple)) else "")
        raise TypeError(f"{fn}: idx_list must be a non-empty list of int64 [B, K] tensors, got {got}")
    ks = []
    for i, idx in enumerate(idx_list):
        check_tensor(fn, f"idx_list[{i}]", idx, ndim=2, dtypes=(torch.int64,), device=device)
        if idx.shape[0] != batch or idx.shape[1] == 0:
            raise ValueError(f"{fn}: idx_list[{i}] has shape {list(idx.shape)}, expected [B={batch}, K] with K >= 1")
        ks.append(idx.shape[1])
    flat = torch.cat([idx.reshape(-1) for idx in idx_list]) if len(ks) > 1 else idx_list[0].reshape(-1)
    return flat.contiguous(), cu_seqlens_of([k for k in ks for _ in range(batch)], device), ks


def acc_dtype(*dtypes):
    """Triton accumulation dtype: fp64 when any input is fp64 (so gradcheck works), fp32 otherwise."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def row_tile(d, whole_row=False):
    """(BLOCK_R, BLOCK_D, num_warps) for kernels over [rows, d] tiles of 4096 elements (65536 in the interpreter,
    whose cost is per program rather than per element).

    whole_row: BLOCK_D covers d (for per-row reductions). Otherwise BLOCK_D is the largest power of two dividing d
    when that is >= 64 (no idle lanes for d = 1280, 1408), else d rounded up to a power of two; at most 1024.
    """
    exact = d & -d
    if whole_row:
        block_d = triton.next_power_of_2(d)
    else:
        block_d = min(exact if exact >= 64 else triton.next_power_of_2(d), 1024)
    block_r = max(1, (65536 if INTERPRET else 4096) // block_d)
    num_warps = min(16, max(4, block_r * block_d // 1024))
    return block_r, block_d, num_warps
