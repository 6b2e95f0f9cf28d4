"""The training step never makes the host wait for the device between metric flushes.

On CUDA this runs the loop's per-step work (pinned host clips to the device, the step's masks, the schedule, the
step itself, the metrics and health spreads kept on the device) under torch.cuda.set_sync_debug_mode("error"),
which raises at any synchronising call. On the CPU a dispatch mode catches the ops that would synchronise on a
GPU (reading a tensor's value on the host; an output whose shape depends on the values: nonzero, a boolean-mask
index, unique, ...), so CI guards most of the rule too.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import SMALL, tiny_config
from vjepa_fast.distributed import DistEnv
from vjepa_fast.health import HealthMonitor
from vjepa_fast.masks import MaskGenerator
from vjepa_fast.optim import apply_schedule, build_optimizer
from vjepa_fast.step import EMA, autocast_for, build_model, masks_generators, step_batches, to_device, train_step
from vjepa_fast.train import StepLog

# V-JEPA 2: RoPE, and clips of two lengths in every batch (positions from token ids, several packed groups).
V2 = ["model.use_rope=true", "model.pred_num_heads=2", "data.dataset_fpcs=[2, 4]", "data.datasets=[a.csv, b.csv]"]

# Tensor methods that hand a tensor's data to the host without an aten op the dispatch mode would see.
HOST_METHODS = ("tolist", "numpy", "__array__", "cpu")


def _bool_index(args) -> bool:
    """Whether an index / index_put argument list indexes by a boolean mask (a hidden nonzero)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def host_read(func, args) -> bool:
    """Whether an aten op reads a tensor's values back to the host: a value as a Python number (item, equal, ...),
    or an output whose shape depends on the values (nonzero, masked_select, unique, a boolean-mask index, ...)."""
    if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._index_put_impl_.default):
        return _bool_index(args)
    return (torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags
            or func is torch.ops.aten.is_nonzero.default)


class HostReads(TorchDispatchMode):
    """Records every op that reads values back to the host (host_read), and every call of HOST_METHODS, run
    inside it; `host_work()` marks a region that works on host tensors by design (not recorded)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self._saved = {}
        self._paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused and host_read(func, args):
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

    @contextlib.contextmanager
    def host_work(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _recording(self, name, original):
        def method(tensor, *args, **kwargs):
            if not self._paused:
                self.seen.append(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)
        return method


def test_the_recorder_catches_host_reads():
    target, source, momentum = [torch.ones(3)], [torch.zeros(3)], torch.tensor(0.9)
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as reads:
        torch._foreach_lerp_(target, source, 1.0 - momentum)  # the Scalar overload reads its weight on the host
        momentum.tolist()
        momentum.numpy()
        bool(x.sum() > 0)
        x[x > 0]  # boolean-mask index: a hidden nonzero
        x.index_put_((x > 0,), torch.tensor(0.0))  # boolean-mask assignment (x[x > 0] = v may be a masked_fill)
        torch.masked_select(x, x < 0)
        torch.unique(x)
        torch.where(x < 0)
        x.repeat_interleave(torch.tensor([1, 2, 0]))
        x[torch.tensor([2, 0])]  # an integer index has its shape from the index: not a read
        x.masked_fill(x < 0, 0.0)
        with reads.host_work():
            x.nonzero()
            x.tolist()
    assert reads.seen == ["aten._local_scalar_dense.default", "Tensor.tolist", "Tensor.numpy",
                          "aten._local_scalar_dense.default", "aten.index.Tensor", "aten.index_put_.default",
                          "aten.masked_select.default", "aten._unique2.default", "aten.nonzero.default",
                          "aten.repeat_interleave.Tensor"]
    momentum.tolist()  # outside: the methods are restored
    assert len(reads.seen) == 10


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

    def step(self, step):
        apply_schedule(self.optimizer, 1e-3, 0.04)
        result = train_step(self.model, self.optimizer, self.ema, self.batches(step),
                            computation=self.computation, autocast=autocast_for(self.cfg, self.device),
                            max_norm=1.0, momentum=0.99, keep_targets=self.health.due(step))
        self.log.add(step, result, 1e-3, 0.04, 0.99, 0.0)


@pytest.mark.parametrize("v2", [False, True], ids=["vjepa", "vjepa2"])
@pytest.mark.parametrize("computation", ["reference", "fast"])
def test_a_cpu_step_reads_nothing_back_to_the_host(computation, v2, monkeypatch):
    loop = StepLoop(tiny_config(*(V2 if v2 else [])), computation, torch.device("cpu"))
    reads = HostReads()
    # Masks are drawn on the host from a CPU generator on every device, then copied (step.draw_masks): on the CPU
    # that host work looks like device work, so the generator alone is left out (the CUDA test covers it too).
    draw = MaskGenerator.gen

    def gen_on_host(self, *args, **kwargs):
        with reads.host_work():
            return draw(self, *args, **kwargs)

    monkeypatch.setattr(MaskGenerator, "gen", gen_on_host)
    with reads:
        for step in range(3):  # the whole step: clips to the device, the step's masks, schedule, step, metrics
            loop.step(step)
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
