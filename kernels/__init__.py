"""Triton kernels for the memory-bound steps of a V-JEPA step, each beside its plain PyTorch reference.

Kernels run on CUDA tensors; on CPU only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is how the CPU tests run them. This package does not import vjepa_fast.
"""
from ._common import INTERPRET
from .ema import FlatParams, ema_, ema_reference_, flatten_params
from .gather_tokens import gather_tokens, gather_tokens_reference
from .masked_l1_loss import masked_l1_loss, masked_l1_loss_reference



def runs_on_cpu() -> bool:
    """True when the kernels accept CPU tensors: the Triton interpreter is on (TRITON_INTERPRET=1)."""
    return bool(INTERPRET)


__all__ = [
    "runs_on_cpu",
    "FlatParams",
    "ema_",
    "ema_reference_",
    "flatten_params",
    "gather_tokens",
    "gather_tokens_reference",
    "masked_l1_loss",
    "masked_l1_loss_reference",
]
