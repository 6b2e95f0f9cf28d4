"""The DALI graph that turns planned clips into the model's input: decode the planned frames, crop the planned box and
resize it (bilinear, no antialiasing: the PyAV path's F.interpolate), flip, normalise with ImageNet statistics, lay
out as [3, T, S, S]. Needs NVIDIA DALI (pip install nvidia-dali-cuda120); imported only by the DALI loader.

On the GPU the decoder is the "mixed" fn.decoders.video (NVDEC) and every later op runs on the GPU, so clips reach
torch on the GPU with no host copy; DALI spreads a batch's clips over `num_threads` threads, and how many keep NVDEC
busy is for bench/data.py --workers to measure. On the CPU (device_id=None) the same graph runs with libavcodec,
which DALI 2.4 builds for VP8, VP9 and MJPEG only.
"""
import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from .spec import ClipSpec
from .transform import IMAGENET_MEAN, IMAGENET_STD

PREFETCH_DEPTH = 2  # batches DALI runs ahead of the one the trainer takes

# The source's outputs, per sample: the file's bytes, frame indices, crop box start and end (y, x) and the flip.
INPUT_TYPES = (types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32)


def clip_inputs(encoded: np.ndarray, frames: np.ndarray, box: tuple[int, int, int, int], flip: bool) -> tuple:
    """One sample of the pipeline's source, in INPUT_TYPES order."""
    top, left, height, width = box
    return (encoded, frames.astype(np.int32), np.array([top, left], np.float32),
            np.array([top + height, left + width], np.float32), np.array(flip, np.int32))


@pipeline_def
def _clip_graph(source, crop_size: int, gpu: bool):
    encoded, frames, roi_start, roi_end, mirror = fn.external_source(
        source=source, num_outputs=len(INPUT_TYPES), batch=True, dtype=list(INPUT_TYPES))
    video = fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames)  # [T, H, W, 3] uint8
    video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, size=[crop_size, crop_size], antialias=False,
                      dtype=types.FLOAT)
    return fn.crop_mirror_normalize(video, mirror=mirror, mean=IMAGENET_MEAN.flatten().tolist(),
                                    std=IMAGENET_STD.flatten().tolist(), output_layout="CFHW", dtype=types.FLOAT)


def build_clip_pipeline(source, spec: ClipSpec, *, batch_size: int, num_threads: int,
                        device_id: int | None) -> Pipeline:
    """A built pipeline whose `source()` returns one batch of clip_inputs tuples, transposed to per-output lists;
    device_id None runs it on the CPU."""
    pipe = _clip_graph(source, spec.crop_size, device_id is not None, batch_size=batch_size,
                       num_threads=num_threads, device_id=device_id, prefetch_queue_depth=PREFETCH_DEPTH)
    pipe.build()
    return pipe
