"""The training step never makes the host wait for the device between metric flushes.

On CUDA this runs the loop's per-step work (pinned host clips to the device, the step's masks, the schedule, the
step itself, the metrics and health spreads kept on the device) under torch.cuda.set_sync_debug_mode("error"),
which raises at any synchronising call. On the CPU a dispatch mode catches the ops that would synchronise on a
GPU (reading a tensor's value on the host, nonzero), so CI guards most of the rule too.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import SMALL, tiny_batch, tiny_config
from vjepa_fast.distributed import DistEnv
from vjepa_fast.health import HealthMonitor
from vjepa_fast.optim import apply_schedule, build_optimizer
from vjepa_fast.step import (EMA, Batch, autocast_for, build_model, draw_masks, masks_generator, to_device,
                             train_step)
from vjepa_fast.train import StepLog

# aten ops whose result the host must read (on CUDA: wait for) to go on
HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.allclose")


# Tensor methods that hand a tensor's data to the host without an aten op the dispatch mode would see.
HOST_METHODS = ("tolist", "numpy", "__array__", "cpu")


class HostReads(TorchDispatchMode):
    """Records every op in HOST_READS, and every call of HOST_METHODS, run inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(HOST_READS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_METHODS:
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._recording(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _recording(self, name, original):
        def method(tensor, *args, **kwargs):
            self.seen.append(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)
        return method


def test_the_recorder_catches_host_reads():
    target, source, momentum = [torch.ones(3)], [torch.zeros(3)], torch.tensor(0.9)
    with HostReads() as reads:
        torch._foreach_lerp_(target, source, 1.0 - momentum)  # the Scalar overload reads its weight on the host
        momentum.tolist()
        momentum.numpy()
    assert reads.seen == ["aten._local_scalar_dense.default", "Tensor.tolist", "Tensor.numpy"]
    momentum.tolist()  # outside: the methods are restored
    assert len(reads.seen) == 3


class StepLoop:
    """The per-step work of train.py's loop, without the loader and the flushes."""

    def __init__(self, cfg, computation, device):
        self.cfg, self.computation, self.device = cfg, computation, device
        self.model = build_model(cfg, device)
        self.ema = EMA(self.model, fused=computation == "fast")
        self.optimizer = build_optimizer(cfg.optimization, self.model.encoder, self.model.predictor)
        self.masks = masks_generator(cfg)
        self.health = HealthMonitor(every=2)
        self.log = StepLog(None, cfg.data.batch_size, dict, DistEnv(), self.health)
        clips = tiny_batch(cfg)[0]
        self.host_clips = clips.pin_memory() if device.type == "cuda" else clips

    def step(self, step, masks=None):
        clips = to_device(self.host_clips, self.device)
        masks_enc, masks_pred = masks or draw_masks(self.masks, self.cfg, step, self.device)
        apply_schedule(self.optimizer, 1e-3, 0.04)
        result = train_step(self.model, self.optimizer, self.ema, [Batch(clips, masks_enc, masks_pred)],
                            computation=self.computation, autocast=autocast_for(self.cfg, self.device),
                            max_norm=1.0, momentum=0.99, keep_targets=self.health.due(step))
        self.log.add(step, result, 1e-3, 0.04, 0.99, 0.0)


@pytest.mark.parametrize("computation", ["reference", "fast"])
def test_a_cpu_step_reads_nothing_back_to_the_host(computation):
    loop = StepLoop(tiny_config(), computation, torch.device("cpu"))
    masks = [draw_masks(loop.masks, loop.cfg, step, loop.device) for step in range(3)]  # drawn on the host
    with HostReads() as reads:
        for step in range(3):
            loop.step(step, masks[step])
    assert reads.seen == []
    rows = loop.log.flush()
    assert rows["step"] == 2 and 0 < rows["loss"] < 10 and rows["health_token_spread"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("computation,compiled", [("reference", False), ("fast", False), ("fast", True)])
def test_cuda_steps_never_synchronise(computation, compiled):
    cfg = tiny_config(f"model.compile={str(compiled).lower()}", *SMALL)
    loop = StepLoop(cfg, computation, torch.device("cuda"))
    for step in range(2):  # warm-up: compilation, first allocations, library handles
        loop.step(step)
    loop.log.flush()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 7):  # new mask lengths every step: new packed layouts
            loop.step(step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    last = loop.log.flush()
    assert last["step"] == 6 and 0 < last["loss"] < 10 and last["skipped_steps_total"] == 0
