"""Per-stage iteration time, throughput, peak memory and MFU of the training step, reference and fast side by side.

    vjepa-fast bench step --config vitl16 --batch 24 [--computations reference,fast] [--backends sdpa,xformers]
                          [--compile off|on|both]

Each variant (computation, attention backend, compiled or not) builds its networks on the device and runs the
training step that train.py runs (vjepa_fast.step.train_step) on synthetic clips held in pinned host memory, as
the loader hands them over. What `ms/iter` is: the timed steps run back to back without a synchronisation
between them, as in training, and ms/iter is the time from the start of the first one's host-to-device copy
(clips and masks, non-blocking) to the end of the last one's EMA update, divided by their number: the throughput
training gets. The masks of the next step are drawn on the host meanwhile; their host time is reported beside
ms/iter (`masks ms (host)`), and counts in it only where the device had to wait for the host, which `gaps ms`
(ms/iter minus the mean device time of a step) shows. Stages are timed with CUDA events (perf_counter on CPU);
`other` is ms/iter minus the stages' medians (launch gaps, waits for the host).

Beside the speed, the parity of each fast variant with the reference on one batch (loss and worst relative
gradient error), so no speed-up is reported without evidence that it computes the same thing. MFU divides the
analytic model FLOPs (vjepa_fast/bench/flops.py; their table per network, linear vs attention, is printed too,
for the timed steps' masks) by the step time and by a peak that is measured (a large matmul in the
compute dtype) or given. Each variant's row is printed and written (JSON, stacked-bar PNG) as soon as it is
measured; a variant that fails is recorded with its error and the others go on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..errors import UserError
from ..model import STAGES
from ..optim import build_optimizer
from ..step import (EMA, Batch, autocast_for, build_model, compute_dtype, masks_generators, move_to, pick_device,
                    step_batches, train_step)
from .ceilings import matmul_tflops
from .flops import StepFlops, mean_flops, step_flops
from .report import write_results

log = logging.getLogger(__name__)

ALL_STAGES = ("h2d", *STAGES, "backward", "optimizer", "ema", "other")  # "other": ms/iter minus the rest
COMPILE_CHOICES = ("off", "on", "both")


class StageTimer:
    """Named stages of steps: CUDA events on GPU (read after the last step, so the steps are not synchronised),
    perf_counter on CPU. Also NVTX and profiler ranges, for traces."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list[tuple[str, object, object]]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_step(self) -> None:
        self.steps.append([])

    @contextlib.contextmanager
    def stage(self, name: str):
        with torch.profiler.record_function(name):
            if self.cuda:
                torch.cuda.nvtx.range_push(name)
            start = self._now()
            try:
                yield
            finally:
                self.steps[-1].append((name, start, self._now()))
                if self.cuda:
                    torch.cuda.nvtx.range_pop()

    def collect(self) -> tuple[list[dict[str, float]], float]:
        """(milliseconds per stage of every step since the last collect, milliseconds from the start of the first
        of them to the end of the last: on the CPU, the sum of the steps), after one synchronisation. Stages may
        nest; a step's outermost stage ends last, so it is the step's last mark."""
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: (b - a) * 1e3)
        out = []
        for marks in self.steps:
            ms: dict[str, float] = {}
            for name, start, end in marks:
                ms[name] = ms.get(name, 0.0) + elapsed(start, end)
            out.append(ms)
        if self.cuda:
            window = elapsed(self.steps[0][-1][1], self.steps[-1][-1][2]) if self.steps else 0.0
        else:  # the CPU cannot overlap the host's work between steps with a step: count the steps alone
            window = sum(elapsed(marks[-1][1], marks[-1][2]) for marks in self.steps)
        self.steps = []
        return out, window


@dataclass
class Variant:
    computation: str
    backend: str
    compiled: bool = False
    stages_ms: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in ALL_STAGES})  # medians
    step_ms: float = 0.0  # ms/iter: the timed window over the number of steps (the module docstring says more)
    device_step_ms: float = 0.0  # median device time of one step, from its copy to its EMA
    gaps_ms: float = 0.0  # step_ms minus the mean device time of a step: the device waiting for the host
    masks_host_ms: float = 0.0  # median host time to draw one step's masks (overlapped in training)
    clips_per_s: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    peak_mem_gb: float | None = None
    build_s: float = 0.0  # building the networks and the optimizer on the device
    first_step_s: float = 0.0  # the first step, compilation included
    loss_rel_err: float | None = None  # vs the reference, on one batch
    grad_rel_err: float | None = None
    parity_error: str | None = None  # why the parity check failed (the timing stands)
    error: str | None = None  # why this variant could not run (e.g. a backend not built for this torch)

    @property
    def label(self) -> str:
        return f"{self.computation}{' compiled' if self.compiled else ''}"


def variant_config(cfg: Config, compiled: bool) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile=compiled))


def clip_groups(cfg: Config) -> dict[int, int]:
    """Clips per clip length in a synthetic batch: data.batch_size at data.num_frames, or (V-JEPA 2's
    data.dataset_fpcs) the batch shared out over the lengths by their datasets' weights (data.datasets_weights,
    else equal), as a training batch is on average."""
    lengths = cfg.data.dataset_fpcs or [cfg.data.num_frames]
    weights = cfg.data.datasets_weights or [1.0] * len(lengths)
    per_length: dict[int, float] = {}
    for frames, weight in zip(lengths, weights):
        per_length[frames] = per_length.get(frames, 0.0) + weight
    exact = {frames: cfg.data.batch_size * w / sum(weights) for frames, w in per_length.items()}
    counts = {frames: math.floor(x) for frames, x in exact.items()}
    for frames in sorted(exact, key=lambda f: counts[f] - exact[f])[:cfg.data.batch_size - sum(counts.values())]:
        counts[frames] += 1  # the largest remainders
    return {frames: n for frames, n in counts.items() if n}


def synthetic_clips(cfg: Config, seed: int = 0) -> list[torch.Tensor]:
    """Random host clips, a tensor per clip length of clip_groups(cfg)."""
    g, d = torch.Generator().manual_seed(seed), cfg.data
    return [torch.randn(n, 3, frames, d.crop_size, d.crop_size, generator=g) for frames, n in clip_groups(cfg).items()]


def host_batch(cfg: Config, masks: dict, clips: list[torch.Tensor], step: int) -> Batch:
    """`clips` with step `step`'s masks, drawn on the host as training draws them (vjepa_fast.step.step_batches)."""
    return step_batches([clips[0] if len(clips) == 1 else clips], masks, cfg, step, torch.device("cpu"))[0]


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device`, copied without a host wait."""
    return Batch(*(move_to(field, device) for field in batch))


def synthetic_batch(cfg: Config, device: torch.device, step: int, seed: int = 0) -> Batch:
    """Random clips of clip_groups(cfg) on `device`, with step `step`'s masks."""
    return batch_to(host_batch(cfg, masks_generators(cfg), synthetic_clips(cfg, seed), step), device)


def batch_flops(cfg: Config, batch: Batch) -> StepFlops:
    """Model FLOPs of one step on `batch` (one clip length, or a group per length)."""
    groups = [batch] if isinstance(batch.clips, torch.Tensor) else list(zip(*batch))
    flops = [step_flops(cfg, [m.size(1) for m in enc], [m.size(1) for m in pred], c.size(0), c.size(2))
             for c, enc, pred in groups]
    return sum(flops[1:], flops[0])


class SyntheticSteps:
    """Training steps of `cfg` on synthetic clips in pinned host memory, every stage timed (what bench and profile
    run): the loop of train.py without the loader. Several clip lengths (data.dataset_fpcs) make each step's batch
    a group per length (clip_groups), as training does."""

    def __init__(self, cfg: Config, computation: str, backend: str, device: torch.device):
        self.cfg, self.computation, self.device = cfg, computation, device
        self.model = build_model(cfg, device)
        self.model.set_attn_backend(backend)
        self.ema = EMA(self.model, fused=computation == "fast")
        self.optimizer = build_optimizer(cfg.optimization, self.model.encoder, self.model.predictor, fused=True)
        self.masks = masks_generators(cfg)
        clips = synthetic_clips(cfg)
        self.host_clips = [c.pin_memory() for c in clips] if device.type == "cuda" else clips
        self.timer = StageTimer(device)

    def run(self, i: int) -> tuple[float, StepFlops]:
        """Queue step i (timed by self.timer; nothing waits for the device): (host ms drawing its masks, model
        FLOPs of its masks)."""
        t0 = time.perf_counter()
        batch = host_batch(self.cfg, self.masks, self.host_clips, i)
        masks_ms = (time.perf_counter() - t0) * 1e3
        self.timer.begin_step()
        with self.timer.stage("step"):
            with self.timer.stage("h2d"):
                batch = batch_to(batch, self.device)
            train_step(self.model, self.optimizer, self.ema, [batch], computation=self.computation,
                       autocast=autocast_for(self.cfg, self.device), max_norm=self.cfg.optimization.clip_grad,
                       momentum=0.999, stage=self.timer.stage)
        return masks_ms, batch_flops(self.cfg, batch)


def time_variant(cfg: Config, v: Variant, device: torch.device, steps: int, warmup: int) -> StepFlops:
    """Fill `v`'s timings: build, `warmup` steps (the first one timed on its own: compilation), `steps` timed.
    Returns the mean model FLOPs of the timed steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    runner = SyntheticSteps(variant_config(cfg, v.compiled), v.computation, v.backend, device)
    v.build_s = time.perf_counter() - t0
    for i in range(warmup):
        t0 = time.perf_counter()
        runner.run(i)
        runner.timer.collect()
        if i == 0:
            v.first_step_s = time.perf_counter() - t0
    host_ms, flops = [], []
    for i in range(warmup, warmup + steps):
        masks_ms, step_flop = runner.run(i)
        host_ms.append(masks_ms)
        flops.append(step_flop)
    per_step, window = runner.timer.collect()
    step_times = [m["step"] for m in per_step]
    v.step_ms = window / len(per_step)
    v.device_step_ms = statistics.median(step_times)
    v.stages_ms = {s: statistics.median(m.get(s, 0.0) for m in per_step) for s in ALL_STAGES if s != "other"}
    v.stages_ms["other"] = max(0.0, v.step_ms - sum(v.stages_ms.values()))
    v.gaps_ms = max(0.0, v.step_ms - statistics.mean(step_times))
    v.masks_host_ms = statistics.median(host_ms)
    v.clips_per_s = cfg.data.batch_size / (v.step_ms / 1e3)
    v.tflops = sum(f.total for f in flops) / (window / 1e3) / 1e12
    if device.type == "cuda":
        v.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return mean_flops(flops)


def parity(cfg: Config, backend: str, device: torch.device) -> tuple[float, float]:
    """(loss relative error, worst per-parameter relative gradient error) of the fast path (compiled when `cfg`
    says so) vs the reference, on one batch and the same weights."""
    model = build_model(cfg, device)
    model.set_attn_backend(backend)
    batch = synthetic_batch(cfg, device, step=1, seed=1)
    results = {}
    for computation in ("reference", "fast"):
        model.zero_grad(set_to_none=True)
        with autocast_for(cfg, device):
            loss = model.loss(*batch, computation=computation)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[computation] = (loss.detach().float(), grads)
    (ref_loss, ref_g), (fast_loss, fast_g) = results["reference"], results["fast"]
    loss_err = (abs(fast_loss - ref_loss) / abs(ref_loss)).item()
    grad_err = max(((fast_g[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref_g.items())
    return loss_err, grad_err


def plan_variants(computations, backends, compile_mode: str) -> list[Variant]:
    """Eager variants first (the reference once: its attention is dense whatever the backend), then the compiled
    fast ones, so a slow compilation costs only itself."""
    if compile_mode not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile_mode!r}")
    eager = compile_mode in ("off", "both")
    variants = [Variant("reference", backends[0])] if "reference" in computations and eager else []
    if "fast" in computations:
        if eager:
            variants += [Variant("fast", b) for b in backends]
        if compile_mode in ("on", "both"):
            variants += [Variant("fast", b, compiled=True) for b in backends]
    return variants


def run(cfg: Config, *, computations=("reference", "fast"), backends=("sdpa",), compile_mode: str = "off",
        device="auto", steps: int = 10, warmup: int = 3, peak_tflops: float | None = None,
        check_parity: bool = True, on_variant=None) -> dict:
    """Time every planned variant; `on_variant(result)` is called after each with the result so far."""
    device = pick_device(device)
    dtype = compute_dtype(cfg, device)
    measured_peak = peak_tflops is None
    peak = matmul_tflops(device, dtype) if measured_peak else peak_tflops
    result = {
        "config": cfg.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "batch": cfg.data.batch_size,
        "tokens": (cfg.data.num_frames // cfg.data.tubelet_size) * (cfg.data.crop_size // cfg.data.patch_size) ** 2,
        "clips_per_length": clip_groups(cfg),
        "model": list(cfg.encoder_size), "steps": steps, "warmup": warmup,
        "peak_tflops": peak, "peak_source": "measured matmul" if measured_peak else "given",
        "ms_per_iter": "steps run back to back as in training (no sync between them), from the first one's "
                       "host-to-device copy of pinned clips and masks to the last one's EMA, over their number: "
                       "copy, target, context, predictor, loss, backward, optimizer, EMA; the host drawing the "
                       "next masks meanwhile counts only where the device waited (gaps)", "variants": [],
    }
    variants = plan_variants(list(computations), list(backends), compile_mode)
    if not variants:
        raise UserError(f"no variant to time: computations {list(computations)} with --compile {compile_mode} "
                        f"(the reference is never compiled)")
    for v in variants:
        try:
            flops = time_variant(cfg, v, device, steps, warmup)
            v.mfu = v.tflops / peak
            result.setdefault("flops_table", flops.table())  # the same masks for every variant
        except Exception as e:  # one broken variant (OOM, a backend not built, a compile error) must not cost the rest
            log.error("bench step: %s with %s attention failed: %s: %s", v.label, v.backend, type(e).__name__, e)
            v.error = f"{type(e).__name__}: {e}"[:300]
        if check_parity and v.computation == "fast" and v.error is None:
            try:
                v.loss_rel_err, v.grad_rel_err = parity(variant_config(cfg, v.compiled), v.backend, device)
            except Exception as e:
                log.error("bench step: parity of %s with %s attention failed: %s: %s", v.label, v.backend,
                          type(e).__name__, e)
                v.parity_error = f"{type(e).__name__}: {e}"[:300]
        result["variants"].append(dataclasses.asdict(v) | {"label": v.label})
        _add_speedups(result)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_variant is not None:
            on_variant(result)
    return result


def _add_speedups(result: dict) -> None:
    ref = next((v for v in result["variants"] if v["computation"] == "reference" and v["error"] is None), None)
    for v in result["variants"]:
        v["speedup"] = ref["step_ms"] / v["step_ms"] if ref and v["error"] is None else None


COLUMNS = ["variant", "attn", "ms/iter", "clips/s", "speed-up", "TFLOP/s", "MFU", "peak GiB", "loss err",
           "grad err", "gaps ms", "masks ms (host)", "build s", "1st step s"]


def row(v: dict) -> str:
    """One variant's markdown table row."""
    if v["error"]:
        return f"| {v['label']} | {v['backend']} | failed: {v['error'][:160]} |"
    if v["parity_error"]:
        v = dict(v, loss_rel_err=None, grad_rel_err=None)
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    cells = [v["label"], v["backend"], fmt(v["step_ms"], ".1f"), fmt(v["clips_per_s"], ".1f"), fmt(v["speedup"], ".2f"),
             fmt(v["tflops"], ".3g"), fmt(v["mfu"], ".1%"), fmt(v["peak_mem_gb"], ".1f"),
             fmt(v["loss_rel_err"], ".1e"), fmt(v["grad_rel_err"], ".1e"), fmt(v["gaps_ms"], ".1f"),
             fmt(v["masks_host_ms"], ".2f"), fmt(v["build_s"], ".1f"), fmt(v["first_step_s"], ".1f")]
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict) -> str:
    groups = result.get("clips_per_length", {})
    lengths = f", clips per length {groups}" if len(groups) > 1 else ""
    head = (f"**{result['config']}** on {result['device']} ({result['dtype']}, batch {result['batch']}{lengths}, "
            f"{result['tokens']} tokens); peak {result['peak_tflops']:.3g} TFLOP/s ({result['peak_source']}); "
            f"ms/iter = {result['ms_per_iter']}\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [row(v) for v in result["variants"]]
    stage_cols = ["variant", "attn", *ALL_STAGES]
    lines += ["", "ms per stage (median):", "", "| " + " | ".join(stage_cols) + " |", "|" + "---|" * len(stage_cols)]
    for v in result["variants"]:
        if v["error"] is None:
            cells = [v["label"], v["backend"], *(f"{v['stages_ms'][s]:.1f}" for s in ALL_STAGES)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\nparity of {v['label']} ({v['backend']}) failed: {v['parity_error']}" for v in result["variants"]
              if v["parity_error"]]
    if "flops_table" in result:
        lines += ["", "model FLOPs per step (mean of the timed steps; 2 per multiply-add):", "", result["flops_table"]]
    return head + "\n".join(lines) + "\n"


def plot_stages(result: dict, out_png: Path) -> Path:
    """Stacked bars of the per-stage time of each variant that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in result["variants"] if v["error"] is None]
    labels = [f"{v['label']}\n{v['backend']}" for v in variants]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * max(1, len(variants)), 4.5))
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


class Reporter:
    """Prints each variant's row as it is measured and rewrites the JSON and the PNG, so a run cut short keeps
    every variant measured before the cut."""

    def __init__(self, out: Path, name: str, stream=sys.stdout):
        self.out, self.name, self.stream, self.printed = Path(out), name, stream, 0

    def __call__(self, result: dict) -> None:
        if self.printed == 0:
            print("| " + " | ".join(COLUMNS) + " |", file=self.stream, flush=True)
        for v in result["variants"][self.printed:]:
            print(row(v), file=self.stream, flush=True)
        self.printed = len(result["variants"])
        self.write(result)

    def write(self, result: dict) -> dict[str, Path]:
        paths = write_results(self.out, self.name, result, markdown(result))
        paths["png"] = plot_stages(result, self.out / f"{self.name}.png")
        return paths
