"""The training step never makes the host wait for the device between metric flushes.

On CUDA this runs the loop's per-step work (pinned host clips to the device, the step's masks, the schedule, the
step itself, the metrics and health spreads kept on the device) under torch.cuda.set_sync_debug_mode("error"),
which raises at any synchronising call. On the CPU a dispatch mode catches the ops that would synchronise on a
GPU (reading a tensor's value on the host, nonzero), so CI guards most of the rule too.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import SMALL, tiny_config
from vjepa_fast.distributed import DistEnv
from vjepa_fast.health import HealthMonitor
from vjepa_fast.optim import apply_schedule, build_optimizer
from vjepa_fast.step import EMA, autocast_for, build_model, masks_generators, step_batches, to_device, train_step
from vjepa_fast.train import StepLog

# V-JEPA 2: RoPE, and clips of two lengths in every batch (positions from token ids, several packed groups).
V2 = ["model.use_rope=true", "model.pred_num_heads=2", "data.dataset_fpcs=[2, 4]", "data.datasets=[a.csv, b.csv]"]

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
    """The per-step work of train.py's loop, without the loader and the flushes: a group of clips per clip length
    of the config, the step's masks drawn as training draws them."""

    def __init__(self, cfg, computation, device):
        self.cfg, self.computation, self.device = cfg, computation, device
        self.model = build_model(cfg, device)
        self.ema = EMA(self.model, fused=computation == "fast")
        self.optimizer = build_optimizer(cfg.optimization, self.model.encoder, self.model.predictor)
        self.masks = masks_generators(cfg)
        self.health = HealthMonitor(every=2)
        self.log = StepLog(None, cfg.data.batch_size, dict, DistEnv(), self.health)
        g, d = torch.Generator().manual_seed(0), cfg.data
        clips = [torch.randn(d.batch_size, 3, frames, d.crop_size, d.crop_size, generator=g) for frames in self.masks]
        self.host_clips = [c.pin_memory() for c in clips] if device.type == "cuda" else clips

    def batches(self, step):
        clips = [to_device(c, self.device) for c in self.host_clips]
        return step_batches([clips[0] if len(clips) == 1 else clips], self.masks, self.cfg, step, self.device)

    def step(self, step, batches=None):
        apply_schedule(self.optimizer, 1e-3, 0.04)
        result = train_step(self.model, self.optimizer, self.ema, batches or self.batches(step),
                            computation=self.computation, autocast=autocast_for(self.cfg, self.device),
                            max_norm=1.0, momentum=0.99, keep_targets=self.health.due(step))
        self.log.add(step, result, 1e-3, 0.04, 0.99, 0.0)


@pytest.mark.parametrize("v2", [False, True], ids=["vjepa", "vjepa2"])
@pytest.mark.parametrize("computation", ["reference", "fast"])
def test_a_cpu_step_reads_nothing_back_to_the_host(computation, v2):
    loop = StepLoop(tiny_config(*(V2 if v2 else [])), computation, torch.device("cpu"))
    batches = [loop.batches(step) for step in range(3)]  # masks drawn on the host
    with HostReads() as reads:
        for step in range(3):
            loop.step(step, batches[step])
    assert reads.seen == []
    rows = loop.log.flush()
    assert rows["step"] == 2 and 0 < rows["loss"] < 10 and rows["health_token_spread"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("computation,compiled,v2",
                         [("reference", False, False), ("fast", False, False), ("fast", True, False),
                          ("fast", False, True)])
def test_cuda_steps_never_synchronise(computation, compiled, v2):
    cfg = tiny_config(f"model.compile={str(compiled).lower()}", *SMALL, *(V2 if v2 else []))
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
