"""EMA of a whole encoder in one launch: target = momentum * target + (1 - momentum) * source over flat buffers."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_tensor

_BLOCK = 4096
# Each parameter starts 256-byte aligned in its flat buffer, as a separate allocation would: vectorised and
# cuBLAS/Triton kernels specialise on pointer alignment.
_ALIGN_BYTES = 256


def ema_reference_(target, source, momentum):
    """Plain PyTorch (what the official training loop does): torch._foreach_lerp_(target, source, 1 - momentum).

    target, source: tensors or equal-length lists of tensors; momentum: float or 0-d tensor (read on the host).
    """
    as_list = (lambda t: [t]) if isinstance(target, torch.Tensor) else list
    with torch.no_grad():
        torch._foreach_lerp_(as_list(target), as_list(source), 1.0 - float(momentum))


@triton.jit
def _ema_kernel(target_ptr, source_ptr, weight, momentum_ptr, n, MOMENTUM_IN_MEMORY: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if MOMENTUM_IN_MEMORY:
        weight = (1.0 - tl.load(momentum_ptr).to(tl.float64)).to(ACC)
    t = tl.load(target_ptr + offs, mask=mask).to(ACC)
    s = tl.load(source_ptr + offs, mask=mask).to(ACC)
    # torch.lerp's two-sided formula, exact at weight 0 and 1.
    out = tl.where(weight < 0.5, t + weight * (s - t), s - (s - t) * (1.0 - weight))
    tl.store(target_ptr + offs, out.to(target_ptr.dtype.element_ty), mask=mask)


@dataclass
class FlatParams:
    """A module's parameters laid out as views of one contiguous buffer per (dtype, device); see flatten_params."""

    buffers: list  # one flat tensor per (dtype, device), in order of first appearance in module.parameters()
    views: list  # (parameter, index into buffers, element offset) for every parameter

    def layout(self):
        """(dtype, device, numel) per buffer and (shape, buffer, offset) per parameter: equal for an EMA pair."""
        return ([(b.dtype, b.device, b.numel()) for b in self.buffers],
                [(tuple(p.shape), b, offset) for p, b, offset in self.views])

    def check(self):
        """Raise RuntimeError if some parameter no longer views its buffer (its .data was replaced)."""
        for p, b, offset in self.views:
            buf = self.buffers[b]
            if p.data_ptr() != buf.data_ptr() + offset * buf.element_size() or p.dtype != buf.dtype:
                raise RuntimeError(
                    f"FlatParams: a parameter of shape {list(p.shape)} no longer views its flat buffer (its .data "
                    "was replaced, e.g. by module.to(), .half() or load_state_dict(assign=True)); flatten again")


def flatten_params(module):
    """Copy `module`'s parameters into one flat buffer per (dtype, device) and point each parameter's .data at its
    slice (256-byte aligned; the gaps are zeros), so that a whole-module EMA (or any elementwise update) is one
    kernel launch over each buffer.

    Parameter objects, their values, requires_grad, names and state_dict() stay the same; only the storage behind
    .data moves (gradients are untouched). Call it right after building the module and before anything captures its
    storages: the optimizer, DDP/FSDP, torch.compile, CUDA graphs. For the EMA pair, flatten the context encoder and
    the target encoder each (copy.deepcopy clones parameters one by one, so a deep copy is not flat). Anything that
    later replaces .data (module.to(), .half(), load_state_dict(assign=True)) breaks the views; ema_ detects it.
    """
    groups = {}
    for p in module.parameters():
        groups.setdefault((p.dtype, p.device), []).append(p)
    buffers, views = [], []
    with torch.no_grad():
        for (dtype, device), params in groups.items():
            align = _ALIGN_BYTES // dtype.itemsize
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + triton.cdiv(p.numel(), align) * align)
            buf = torch.zeros(offsets[-1], dtype=dtype, device=device)
            for p, offset in zip(params, offsets):
                view = buf[offset:offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view
                views.append((p, len(buffers), offset))
            buffers.append(buf)
    return FlatParams(buffers, views)


def _ema_buffer_(target, source, momentum):
    fn = "ema_"
    check_tensor(fn, "target", target)
    check_tensor(fn, "source", source, device=target.device)
    if source.shape != target.shape or source.dtype != target.dtype:
        raise ValueError(f"{fn}: source is {source.dtype} {list(source.shape)}, target is {target.dtype} "
                         f"{list(target.shape)}; they must match")
    if not (target.is_contiguous() and source.is_contiguous()):
        raise ValueError(f"{fn}: target and source must be contiguous (flat buffers), got strides "
                         f"{target.stride()} and {source.stride()}")
    if isinstance(momentum, torch.Tensor):
        check_tensor(fn, "momentum", momentum, ndim=0, device=target.device)
        weight, momentum_ptr = 0.0, momentum
    elif isinstance(momentum, (float, int)) and 0.0 <= momentum <= 1.0:
        weight, momentum_ptr = 1.0 - momentum, None
    else:
        raise ValueError(f"{fn}: momentum must be a float in [0, 1] or a 0-d tensor on {target.device}, "
                         f"got {momentum!r}")
    n = target.numel()
    _ema_kernel[(triton.cdiv(n, _BLOCK),)](
        target, source, weight, momentum_ptr, n, MOMENTUM_IN_MEMORY=momentum_ptr is not None,
        ACC=acc_dtype(target.dtype), BLOCK=_BLOCK, num_warps=8)


def ema_(target, source, momentum):
    """In place: target = momentum * target + (1 - momentum) * source, as torch.lerp(target, source, 1 - momentum).

    target, source: equal contiguous tensors, or FlatParams of the target and source modules (one launch per
    buffer, so one for a single-dtype encoder). momentum: Python float, or 0-d tensor on the device (read by the
    kernel, so a momentum schedule kept on the GPU needs no host synchronisation). Math in fp32 (fp64 for fp64).
    """
    if isinstance(target, FlatParams) and isinstance(source, FlatParams):
        target.check()
        source.check()
        if target.layout() != source.layout():
            raise ValueError(f"ema_: target and source FlatParams differ in layout: {target.layout()} vs "
                             f"{source.layout()}")
        for t, s in zip(target.buffers, source.buffers):
            _ema_buffer_(t, s, momentum)
    elif isinstance(target, torch.Tensor) and isinstance(source, torch.Tensor):
        _ema_buffer_(target, source, momentum)
    else:
        raise TypeError(f"ema_: target and source must both be tensors or both FlatParams, got "
                        f"{type(target).__name__} and {type(source).__name__}")
