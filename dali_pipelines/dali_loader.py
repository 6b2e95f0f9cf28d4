"""The DALI clip loader: the PyAV loader's clips, decoded and augmented by a DALI pipeline on the GPU (NVDEC) or,
with device "cpu", by the same pipeline on the CPU (VP8, VP9 and MJPEG only).

The host makes every choice exactly as the PyAV loader does (clip_plan.py: video, frame indices, crop box and flip
from (seed, stream position)), reads the chosen file's bytes in a thread pool, and feeds bytes and choices to the
pipeline (dali_pipeline.py), which decodes exactly the planned frames (fn.decoders.video(frames=...)). So:
- sampling is the official one, with no DALI approximation (the same clip_plan.plan_clip): a span at a random end,
  linspace, last frame repeated for short videos; one random-resized-crop box and one flip per clip;
- batch k is a pure function of (seed, k, rank, world_size, dataset), and start_step=k resumes exactly (own
  bookkeeping, no DALI checkpoint);
- for the same video it gives the PyAV loader's clip up to the decoders' YUV->RGB conversion (a few levels on 0-255)
  and, for a video only DALI rejects, a different replacement draw.
Differences from the PyAV loader: each clip ships its whole file to DALI (fine for clips of seconds to minutes), and
every clip's file is probed (demuxed, cached) on the host. Measured with DALI 2.4 on the CPU: fn.decoders.video
does not seek in an in-memory file, so a clip's cost grows with its position (a 16x4 clip at frame 0/100/230 of a
300-frame 340x256 VP9 file: 31/98/134 ms, PyAV 38/45/55 ms; MJPEG likewise); hence 'auto' never takes DALI's CPU
pipeline, and whether the GPU decoder seeks must be measured (bench/data.py) on a machine with DALI and a GPU.

Bad input: what the probe rejects, and codecs this device's DALI decoder cannot read ('unsupported', also image
entries, which the PyAV loader reads), are replaced before decoding, as in the PyAV loader. A planned clip that
probes but that DALI fails to decode invalidates the pipeline: the loader decodes that batch's clips one at a time
to find the failing ones, marks those (file, frames) plans 'undecodable' and rebuilds the pipeline at the same step,
whose fresh draws replace them.
"""
import collections
import concurrent.futures
from typing import NamedTuple

import numpy as np
import torch

from ..errors import UserError
from .bad_input import VideoError
from .clip_plan import ClipPlan, is_image, load_first_usable
from .dataset_file import DatasetIndex
from .loader import StepLoader
from .spec import ClipSpec

# Codecs DALI 2.x decodes, by device: NVDEC on the GPU; on the CPU DALI's libavcodec has only these three.
DALI_CODECS = {
    "gpu": frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"}),
    "cpu": frozenset({"vp8", "vp9", "mjpeg"}),
}


class InFlight(NamedTuple):
    """A batch fed to DALI and not yet returned: what the trainer gets beside the clips, and what a recovery needs."""
    labels: torch.Tensor
    attempts: list
    plans: list[ClipPlan]
    samples: list[tuple]  # the pipeline's inputs, per clip


class DaliClipLoader(StepLoader):
    """The DALI StepLoader; clips come out on the current CUDA device (device "gpu") or on the CPU ("cpu").
    `num_workers` sets both DALI's threads (parallel decoding of a batch's clips) and the host planning threads."""

    def __init__(self, dataset: DatasetIndex, spec: ClipSpec, *, batch_size: int, seed: int, start_step: int,
                 rank: int, world_size: int, num_workers: int, device: str):
        if len(spec.clip_lengths) > 1:
            raise UserError(f"the DALI loader stacks one clip length per batch; clips of {spec.clip_lengths} frames "
                            f"(data.dataset_fpcs) need data.loader=pyav")
        super().__init__(dataset, start_step=start_step, rank=rank, world_size=world_size, seed=seed)
        self.dataset, self.spec, self.seed, self.batch_size = dataset, spec, seed, batch_size
        self.device = device
        self.codecs = DALI_CODECS[device]
        self.num_threads = max(1, num_workers)
        self._undecodable: dict[tuple[str, bytes], str] = {}  # (path, frames) plans DALI failed on -> its error
        self._start()

    def _start(self) -> None:
        """A fresh planner and pipeline whose first batch is self.step."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._planner = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="clip_plan")
        self._planned = collections.deque()  # per batch ahead, the futures of its load_first_usable results
        self._next_planned = self.step
        self._in_flight = collections.deque()  # InFlight batches, oldest first
        self._feed_failed = False
        # prepare_first_batch=False: a first batch's failure surfaces in __next__, where it is handled
        self._batches = DALIGenericIterator([self._build(self._feed, self.batch_size)], ["clips"],
                                            prepare_first_batch=False)

    def _build(self, source, batch_size: int):
        from .dali_pipeline import build_clip_pipeline

        device_id = torch.cuda.current_device() if self.device == "gpu" else None
        return build_clip_pipeline(source, self.spec, batch_size=batch_size, num_threads=self.num_threads,
                                   device_id=device_id)

    def _read(self, plan: ClipPlan) -> tuple[np.ndarray, ClipPlan]:
        """load_first_usable's load step: the planned file's bytes, unless DALI cannot decode the plan."""
        if is_image(plan.path):
            raise VideoError("unsupported", "an image: DALI's video decoder reads videos only (data.loader=pyav reads "
                                            "images)")
        if plan.info.codec not in self.codecs:
            raise VideoError("unsupported", f"{plan.info.codec} video: DALI's {self.device} decoder reads only "
                                            f"{', '.join(sorted(self.codecs))}")
        failure = self._undecodable.get((plan.path, plan.frames.tobytes()))
        if failure is not None:
            raise VideoError("undecodable", failure)
        try:
            return np.fromfile(plan.path, dtype=np.uint8), plan
        except OSError as error:
            raise VideoError("missing", f"cannot read: {error}") from None

    def _feed(self):
        """The pipeline's source: the next batch's inputs, planned (and read) a few batches ahead."""
        from .dali_pipeline import PREFETCH_DEPTH, clip_inputs

        try:
            while len(self._planned) <= PREFETCH_DEPTH:
                keys = self.order.batch(self._next_planned, self.batch_size)
                self._planned.append([self._planner.submit(load_first_usable, self.dataset, self.spec, self.seed,
                                                           key, self._read) for key in keys])
                self._next_planned += 1
            loaded, labels, attempts = zip(*[future.result() for future in self._planned.popleft()])
        except BaseException:
            self._feed_failed = True  # not a decoding failure: __next__ must not try to recover from it
            raise
        plans = [plan for _, plan in loaded]
        samples = [clip_inputs(encoded, plan.frames, plan.box, plan.flip) for encoded, plan in loaded]
        self._in_flight.append(InFlight(torch.tensor(labels, dtype=torch.int64),
                                        [a for item in attempts for a in item], plans, samples))
        return [list(column) for column in zip(*samples)]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            try:
                clips = next(self._batches)[0]["clips"]
                break
            except Exception as error:
                if self._feed_failed or not self._in_flight:
                    self.close()
                    raise
                self._recover(error)
        batch = self._in_flight.popleft()
        try:
            self.skips.record(batch.attempts)
        except RuntimeError:
            self.close()
            raise
        self.step += 1
        return clips, batch.labels

    def _recover(self, error: Exception) -> None:
        """After DALI failed on the oldest batch in flight: mark the plans of it that DALI cannot decode on their
        own and restart at the same step; re-raise `error` if every clip decodes on its own."""
        batch = self._in_flight[0]
        failures = {}
        for plan, sample in zip(batch.plans, batch.samples):
            detail = self._decode_failure(sample)
            if detail is not None:
                failures[(plan.path, plan.frames.tobytes())] = detail
        if not failures:
            self.close()
            raise error
        self.close()
        self._undecodable.update(failures)
        self._start()

    def _decode_failure(self, sample: tuple) -> str | None:
        """DALI's error for one clip's inputs run alone (in a throwaway one-clip pipeline), or None if it decodes."""
        try:
            self._build(lambda: [[value] for value in sample], 1).run()
        except Exception as error:
            return dali_error_detail(str(error))
        return None

    def close(self) -> None:
        self._planner.shutdown(wait=True, cancel_futures=True)
        self._batches = None


def dali_error_detail(message: str) -> str:
    """What went wrong, from a DALI error message (the first line after DALI's pipeline context)."""
    lines = [line.strip() for line in message.partition("encountered:")[2].splitlines() if line.strip()]
    return f"DALI cannot decode it: {lines[0][:200] if lines else message.strip()[:200]}"
