"""Video data for V-JEPA training: dataset files -> deterministic, step-indexed batches of augmented clips.

The trainer needs only this interface: ClipSpec (what a clip is), read_dataset_files (the official `path label`
format) and make_loader (an infinite StepLoader of (clips [B, 3, T, H, W], labels [B]) whose batch k depends only
on seed, k, rank, world_size and the dataset; PyAV on the CPU or DALI on the GPU/CPU, see choose.py). The DALI
loader imports NVIDIA DALI only when it is used. This package does not import vjepa_fast.
"""
from .bad_input import SKIP_REASONS
from .choose import LOADERS, choose_loader, make_loader
from .dataset_file import DatasetIndex, read_dataset_files
from .loader import StepLoader
from .spec import ClipSpec

__all__ = ["ClipSpec", "DatasetIndex", "read_dataset_files", "make_loader", "choose_loader", "LOADERS",
           "StepLoader", "SKIP_REASONS"]
