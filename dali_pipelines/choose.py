"""Which loader decodes a dataset (config `data.loader`), and make_loader, which builds it.

'pyav' decodes any codec on the CPU. 'dali' runs the DALI pipeline on the GPU when CUDA is present, else on the CPU
(VP8, VP9, MJPEG only). 'auto' takes DALI on the GPU when CUDA and DALI are there and the codecs of the dataset's
first files are all NVDEC's; otherwise PyAV, which on a CPU is faster than DALI's CPU decoder (bench/data.py).
The choice and its reason are logged once, when the loader is made.
"""
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from .bad_input import VideoError
from .clip_plan import is_image
from .dali_loader import DALI_CODECS, DaliClipLoader
from .dataset_file import DatasetIndex, read_dataset_files
from .loader import PyAVClipLoader, StepLoader
from .pyav_decode import probe_video
from .spec import ClipSpec

logger = logging.getLogger(__name__)

LOADERS = ("auto", "dali", "pyav")
CODEC_SAMPLE = 8  # 'auto' probes this many dataset files for their codecs
DALI_INSTALL = "pip install nvidia-dali-cuda120 (or: pip install -e .[dali])"


@dataclass(frozen=True)
class LoaderChoice:
    name: str  # "pyav" or "dali"
    device: str  # "cpu" or "gpu"
    reason: str


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # not even the nvidia namespace package
        return False


def choose_loader(requested: str, dataset: DatasetIndex, spec: ClipSpec | None = None) -> LoaderChoice:
    """The loader `requested` ('auto', 'dali' or 'pyav') means on this machine for `dataset` (and clips `spec`)."""
    if requested not in LOADERS:
        raise UserError(f"unknown loader {requested!r}: expected one of {', '.join(LOADERS)}")
    if requested == "pyav":
        return LoaderChoice("pyav", "cpu", "data.loader is pyav")
    if requested == "auto" and spec is not None and len(spec.clip_lengths) > 1:
        return LoaderChoice("pyav", "cpu", f"clips of several lengths {spec.clip_lengths} (DALI stacks one per batch)")
    cuda = torch.cuda.is_available()
    if requested == "dali":
        if not dali_installed():
            raise UserError(f"data.loader is dali but NVIDIA DALI is not installed: {DALI_INSTALL}")
        device = "gpu" if cuda else "cpu"
        return LoaderChoice("dali", device, f"data.loader is dali; {'CUDA' if cuda else 'no CUDA'}: DALI on the "
                                            f"{device.upper()}")
    if not cuda:
        return LoaderChoice("pyav", "cpu", "no CUDA device, and on a CPU PyAV decodes faster than DALI")
    if not dali_installed():
        return LoaderChoice("pyav", "cpu", f"NVIDIA DALI is not installed ({DALI_INSTALL})")
    image = next((path for path in dataset.paths if is_image(path)), None)  # anywhere: a name check, no probe
    if image is not None:
        return LoaderChoice("pyav", "cpu", f"{image} is an image, which DALI's video decoder does not read")
    for path in dict.fromkeys(dataset.paths[:CODEC_SAMPLE]):
        try:
            codec = probe_video(path).codec
        except VideoError:
            continue  # skipped by either loader; says nothing about the codecs
        if codec not in DALI_CODECS["gpu"]:
            return LoaderChoice("pyav", "cpu", f"{path} is {codec}, which NVDEC does not decode")
    return LoaderChoice("dali", "gpu", "CUDA and DALI present, and the dataset's codecs are NVDEC's")


def make_loader(paths: Sequence[str], spec: ClipSpec, *, batch_size: int, seed: int,
                weights: Sequence[float] | None = None, start_step: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 1, loader: str = "auto") -> StepLoader:
    """A loader over the dataset files `paths` (official `path label` format) that starts at batch `start_step`;
    its batches are the same clips whichever loader `loader` picks (up to the decoders' colour conversion)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    dataset = read_dataset_files(paths, weights)
    choice = choose_loader(loader, dataset, spec)
    logger.info("data loader: %s on the %s (%s)", choice.name, choice.device.upper(), choice.reason)
    arguments = dict(batch_size=batch_size, seed=seed, start_step=start_step, rank=rank, world_size=world_size,
                     num_workers=num_workers)
    if choice.name == "dali":
        return DaliClipLoader(dataset, spec, device=choice.device, **arguments)
    return PyAVClipLoader(dataset, spec, **arguments)
