"""Triton kernels for the memory-bound steps of a V-JEPA step, each beside its plain PyTorch reference.

Kernels run on CUDA tensors; on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is how the CPU tests run them. This package does not import vjepa_fast.
"""
from ._common import cu_seqlens_of, runs_on, to_device
from .ema import FlatParams, ema_, ema_reference_, flatten_params
from .masked_l1_loss import masked_l1_loss, masked_l1_loss_reference
from .pack_tokens import pack_tokens, pack_tokens_reference
from .rope import grid_positions, rope, rope_reference

__all__ = [
    "runs_on",
    "to_device",
    "cu_seqlens_of",
    "FlatParams",
    "ema_",
    "ema_reference_",
    "flatten_params",
    "pack_tokens",
    "pack_tokens_reference",
    "masked_l1_loss",
    "masked_l1_loss_reference",
    "rope",
    "rope_reference",
    "grid_positions",
]
