"""Per-stage iteration time, throughput, peak memory and MFU of the training step, reference and fast side by side.

    vjepa-fast bench step --config vitl16 --batch 24 [--paths reference,fast] [--backends sdpa,xformers]

Every (path, attention backend) runs the same step on the same synthetic on-device clips and the same masks,
after warm-up, timing each stage (data, masks, target, context, predictor, loss, backward, optimizer, ema) with
CUDA events on GPU and a monotonic clock on CPU; the median over steps is reported. Beside the speed, the parity
of each fast variant with the reference on one batch (loss and worst relative gradient error), so a speed-up is
never reported without evidence that it computes the same thing. MFU divides the analytic model FLOPs
(bench/flops.py) by the step time and by a peak that is measured (a large matmul in the compute dtype) or given.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.flops import step_flops
from bench.report import write_results
from vjepa_fast.config import Config
from vjepa_fast.masks import MaskGenerator
from vjepa_fast.model import STAGES, VJEPA
from vjepa_fast.optim import build_optimizer
from vjepa_fast.train import EMA, autocast_for, seed_everything, train_step

log = logging.getLogger(__name__)

ALL_STAGES = ("data", "masks", *STAGES, "backward", "optimizer", "ema")


class StageTimer:
    """Times named stages of one step: CUDA events on GPU (read after one synchronisation), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        with torch.profiler.record_function(name):
            if self.cuda:
                torch.cuda.nvtx.range_push(name)
            start = self._now()
            try:
                yield
            finally:
                self.marks.append((name, start, self._now()))
                if self.cuda:
                    torch.cuda.nvtx.range_pop()

    def collect(self) -> dict[str, float]:
        """Milliseconds per stage of the step just run (synchronises once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, start, end in self.marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            out[name] = out.get(name, 0.0) + ms
        self.marks = []
        return out


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved TFLOP/s of a large square matmul: the bf16 peak on GPU (fp32 on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


@dataclass
class Variant:
    path: str
    backend: str
    stages_ms: dict[str, float] = field(default_factory=dict)  # median per stage
    step_ms: float = 0.0  # median of the whole step
    clips_per_s: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    peak_mem_gb: float | None = None
    loss_rel_err: float | None = None  # vs the reference, on one batch
    grad_rel_err: float | None = None
    error: str | None = None  # why this variant could not run (e.g. a backend not built for this torch)


def _synthetic_clips(cfg: Config, device, generator) -> torch.Tensor:
    d = cfg.data
    return torch.randn(d.batch_size, 3, d.num_frames, d.crop_size, d.crop_size, device=device, generator=generator)


def _masks(cfg: Config, step: int, device):
    d = cfg.data
    gen = MaskGenerator(cfg.mask, d.crop_size, d.num_frames, d.patch_size, d.tubelet_size)
    enc, pred = gen.gen(d.batch_size, step, generator=torch.Generator().manual_seed(step))
    return [m.to(device, non_blocking=True) for m in enc], [m.to(device, non_blocking=True) for m in pred]


def _build(cfg: Config, backend: str, path: str, device):
    seed_everything(cfg.meta.seed)
    model = VJEPA(cfg).to(device)
    model.set_attn_backend(backend)
    ema = EMA(model, fused=path == "fast")
    optimizer = build_optimizer(cfg.optimization, model.encoder, model.predictor, fused=True)
    return model, optimizer, ema


class SyntheticSteps:
    """Training steps of `cfg` on synthetic on-device clips, every stage timed (what bench and profile run)."""

    def __init__(self, cfg: Config, path: str, backend: str, device: torch.device):
        self.cfg, self.path, self.device = cfg, path, device
        self.model, self.optimizer, self.ema = _build(cfg, backend, path, device)
        self.timer = StageTimer(device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def run(self, i: int) -> tuple[dict[str, float], float]:
        """Step i: (ms per stage, model FLOPs of its masks)."""
        with self.timer.stage("data"):
            clips = _synthetic_clips(self.cfg, self.device, self.generator)
        with self.timer.stage("masks"):
            enc, pred = _masks(self.cfg, i, self.device)
        train_step(self.model, self.optimizer, self.ema, clips, enc, pred, path=self.path,
                   autocast=autocast_for(self.cfg, self.device), max_norm=self.cfg.optimization.clip_grad,
                   momentum=0.999, stage=self.timer.stage)
        return self.timer.collect(), step_flops(self.cfg, [m.size(1) for m in enc], [m.size(1) for m in pred]).total


def time_variant(cfg: Config, path: str, backend: str, device: torch.device, steps: int, warmup: int) -> Variant:
    runner = SyntheticSteps(cfg, path, backend, device)
    per_step, flops = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        ms, step_flop = runner.run(i)
        if i >= warmup:
            per_step.append(ms)
            flops.append(step_flop)
    v = Variant(path, backend)
    v.stages_ms = {s: statistics.median(m.get(s, 0.0) for m in per_step) for s in ALL_STAGES}
    totals = [sum(m.values()) for m in per_step]
    v.step_ms = statistics.median(totals)
    v.clips_per_s = cfg.data.batch_size / (v.step_ms / 1e3)
    v.tflops = sum(flops) / (sum(totals) / 1e3) / 1e12
    if device.type == "cuda":
        v.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return v


def parity(cfg: Config, backend: str, device: torch.device) -> tuple[float, float]:
    """(loss relative error, worst per-parameter relative gradient error) of the fast path vs the reference."""
    model, _, _ = _build(cfg, backend, "reference", device)
    clips = _synthetic_clips(cfg, device, torch.Generator(device=device).manual_seed(1))
    enc, pred = _masks(cfg, 1, device)
    results = {}
    for path in ("reference", "fast"):
        model.zero_grad(set_to_none=True)
        with autocast_for(cfg, device):
            loss = model.loss(clips, enc, pred, path=path)
        loss.backward()
        results[path] = (loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                                 if p.grad is not None})
    (ref_loss, ref_g), (fast_loss, fast_g) = results["reference"], results["fast"]
    loss_err = (abs(fast_loss - ref_loss) / abs(ref_loss)).item()
    grad_err = max(((fast_g[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref_g.items())
    return loss_err, grad_err


def run(cfg: Config, *, paths=("reference", "fast"), backends=("sdpa",), device="auto", steps: int = 10,
        warmup: int = 3, peak_tflops: float | None = None, check_parity: bool = True) -> dict:
    from vjepa_fast.train import pick_device

    device = pick_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.meta.dtype == "bfloat16" else torch.float32
    measured_peak = peak_tflops is None
    peak = measure_peak_tflops(device, dtype) if measured_peak else peak_tflops
    variants = []
    for backend in backends:
        for path in paths:
            if path == "reference" and any(v.path == "reference" for v in variants):
                continue  # the reference path is the same for every packed-attention backend
            try:
                v = time_variant(cfg, path, backend, device, steps, warmup)
                v.mfu = v.tflops / peak
                if check_parity and path == "fast":
                    v.loss_rel_err, v.grad_rel_err = parity(cfg, backend, device)
            except (RuntimeError, NotImplementedError) as e:  # one broken variant must not cost the others
                log.error("bench step: %s path with %s attention failed: %s", path, backend, e)
                v = Variant(path, backend, stages_ms={s: 0.0 for s in ALL_STAGES},
                            error=f"{type(e).__name__}: {e}"[:300])
            variants.append(v)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = next((v for v in variants if v.path == "reference" and v.error is None), None)
    return {
        "config": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": cfg.data.batch_size,
        "tokens": (cfg.data.num_frames // cfg.data.tubelet_size) * (cfg.data.crop_size // cfg.data.patch_size) ** 2,
        "model": list(cfg.encoder_size), "compile": cfg.model.compile, "steps": steps, "warmup": warmup,
        "peak_tflops": peak, "peak_source": "measured matmul" if measured_peak else "given",
        "variants": [dict(v.__dict__, speedup=(ref.step_ms / v.step_ms) if ref and v.error is None else None)
                     for v in variants],
    }


def markdown(result: dict) -> str:
    head = (f"**{result['config']}** on {result['device']} ({result['dtype']}, batch {result['batch']}, "
            f"{result['tokens']} tokens, compile={result['compile']}); peak {result['peak_tflops']:.3g} TFLOP/s "
            f"({result['peak_source']})\n\n")
    cols = ["path", "attn", "ms/iter", "clips/s", "speed-up", "TFLOP/s", "MFU", "peak GiB", "loss err", "grad err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for v in result["variants"]:
        if v["error"]:
            lines.append(f"| {v['path']} | {v['backend']} | failed: {v['error'][:120]} |")
            continue
        lines.append("| " + " | ".join([v["path"], v["backend"], fmt(v["step_ms"], ".1f"), fmt(v["clips_per_s"], ".1f"),
                                        fmt(v["speedup"], ".2f"), fmt(v["tflops"], ".3g"), fmt(v["mfu"], ".1%"),
                                        fmt(v["peak_mem_gb"], ".1f"), fmt(v["loss_rel_err"], ".1e"),
                                        fmt(v["grad_rel_err"], ".1e")]) + " |")
    stage_cols = ["path", "attn", *ALL_STAGES]
    lines += ["", "ms per stage (median):", "", "| " + " | ".join(stage_cols) + " |", "|" + "---|" * len(stage_cols)]
    for v in result["variants"]:
        lines.append("| " + " | ".join([v["path"], v["backend"]] + [f"{v['stages_ms'][s]:.1f}" for s in ALL_STAGES])
                     + " |")
    return head + "\n".join(lines) + "\n"


def plot_stages(result: dict, out_png: Path) -> Path:
    """Stacked bars of the per-stage time of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    labels = [f"{v['path']}\n{v['backend']}" for v in variants]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(variants), 4.5))
    bottom = [0.0] * len(variants)
    for stage in ALL_STAGES:
        values = [v["stages_ms"][stage] for v in variants]
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom = [b + x for b, x in zip(bottom, values)]
    ax.set_ylabel("ms per iteration (median)")
    ax.set_title(f"{result['config']}, batch {result['batch']}, {result['device']}")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write(result: dict, out: Path, name: str) -> dict[str, Path]:
    paths = write_results(out, name, result, markdown(result))
    paths["png"] = plot_stages(result, Path(out) / f"{name}.png")
    return paths
