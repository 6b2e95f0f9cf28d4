"""The frozen-evaluation protocol: train probes on frozen tokens, report top-1/top-5 on the val set per epoch.

Optimisation as the official evals (V-JEPA 1 evals/*_frozen/eval.py init_opt, V-JEPA 2's multihead version):
AdamW; per step (the schedules step before each batch, so the first batch already has step 1) lr linear from
`start_lr` over `warmup` epochs (0 in all but some V-JEPA 2 ViT-g configs), then cosine from `lr` to `final_lr`,
and weight decay cosine from `weight_decay` to `final_weight_decay` (1e-6 in V-JEPA 1) over epochs x batches;
V-JEPA 1 exempts biases and 1-D parameters from weight decay and clips the gradient norm at 1, V-JEPA 2 decays
every parameter and does not clip. On CUDA the probes run under float16 autocast with
a GradScaler per probe (the configs' use_bfloat16, which the official code implements as float16); on the CPU in
float32, as the official code does there. Each training item is one sample per epoch, shuffled as a
DistributedSampler (seed + epoch), last batch smaller. Several probes (V-JEPA 2's multihead_kwargs sweep) train
on the same batches; each epoch's reported val top-1 is the best probe's, as the official V-JEPA 2 eval reports
it. A val item's prediction is the mean of its views' softmax (multi-view eval); accuracy is per item.

A batch (the official runs' per-GPU batch x GPUs) runs in micro-batches of `micro_batch` items, as the official
runs split it over GPUs: each micro-batch's loss is scaled by its share of the batch and the gradients accumulate,
so the step sees the mean over the batch, as DDP's averaged gradient (the linear probe's BatchNorm, ours, takes
its statistics per micro-batch, as it would per GPU).
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..optim import param_groups
from .features import FeatureSet, autocast
from .probe import build_probe

CSV_FIELDS = ["epoch", "lr", "weight_decay", "train_loss", "train_top1", "val_top1", "val_top5", "best_probe",
              "seconds"]


@dataclass(frozen=True)
class HeadSettings:
    """One probe's optimisation (an entry of V-JEPA 2's multihead_kwargs): lr linear from start_lr (default: lr)
    to lr over `warmup` epochs, then cosine to final_lr; weight decay cosine from weight_decay to
    final_weight_decay over the whole training."""
    lr: float = 1e-3
    final_lr: float = 0.0
    weight_decay: float = 0.01
    final_weight_decay: float = 1e-6
    start_lr: float | None = None
    warmup: float = 0.0  # epochs

    def lr_at(self, step: int, total: int, warmup_steps: int) -> float:
        """The official WarmupCosineSchedule at `step` (1-based) of `total`."""
        if step < warmup_steps:
            start = self.lr if self.start_lr is None else self.start_lr
            return start + step / max(1, warmup_steps) * (self.lr - start)
        return cosine(self.lr, self.final_lr, step - warmup_steps, total - warmup_steps)


@dataclass(frozen=True)
class ProbeSettings:
    """The protocol's settings; the defaults are V-JEPA 1's video protocol (configs/evals/vitl16_k400_16x8x3.yaml:
    20 epochs, 4 videos x 64 GPUs per batch). `sweep` (non-empty) replaces the single probe's `head` by one probe
    per entry. `micro_batch` (items per encoder and probe forward; the official per-GPU batch) does not change
    the result beyond rounding (but for the linear probe's BatchNorm statistics, taken per micro-batch)."""
    epochs: int = 20
    batch_size: int = 256
    micro_batch: int = 4
    head: HeadSettings = HeadSettings()
    sweep: tuple[HeadSettings, ...] = ()
    depth: int = 1  # attentive probe blocks (V-JEPA 2: 4)
    num_heads: int | None = None  # attention heads of the attentive probe (default: the encoder's)
    clip_grad: float | None = 1.0  # V-JEPA 2: None
    decay_all: bool = False  # V-JEPA 2: weight decay on biases and 1-D parameters too
    seed: int = 0

    def __post_init__(self):
        for key in ("epochs", "batch_size", "micro_batch"):
            if getattr(self, key) < 1:
                raise UserError(f"probe {key} must be >= 1, got {getattr(self, key)}")

    def heads(self) -> tuple[HeadSettings, ...]:
        return self.sweep or (self.head,)


# configs/evals/vitl16_in1k.yaml: 16 images x 64 GPUs
IMAGE_PROTOCOL = ProbeSettings(batch_size=1024, micro_batch=16, head=HeadSettings(weight_decay=0.001))


@dataclass
class ProbeResult:
    probe: str
    top1: float  # val top-1 (%) after the last epoch (the best probe's, with a sweep)
    top5: float | None  # val top-5 (%) of that probe when there are more than 5 classes
    history: list[dict] = field(default_factory=list)  # the CSV rows
    seconds: float = 0.0
    probes: list[torch.nn.Module] = field(default_factory=list, repr=False)  # the trained probes, one per head


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """% of rows of scores [M, C] whose label is among their k highest scores."""
    top = scores.topk(min(k, scores.size(1)), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def cosine(start: float, end: float, step: int, total: int) -> float:
    """The official cosine schedules' value at `step` (1-based) of `total` (CosineWDSchedule; the lr's after
    warmup)."""
    value = end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))
    return max(end, value) if end <= start else min(end, value)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """A DistributedSampler's shuffle on one rank: randperm seeded with seed + epoch."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))


def _tokens(features: FeatureSet, samples: np.ndarray, views: np.ndarray | slice, device) -> torch.Tensor:
    """float32 tokens of samples (indices into features.rows) at `views`, on `device`."""
    return torch.from_numpy(np.ascontiguousarray(features.tokens[features.rows[samples], views])).to(device).float()


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The items of each batch of an epoch: epoch_order cut into batches, the last one smaller."""
    order = epoch_order(num_items, seed, epoch).numpy()
    return [order[start:start + batch_size] for start in range(0, num_items, batch_size)]


def split(items: np.ndarray, size: int) -> list[np.ndarray]:
    """`items` cut into micro-batches of `size`, the last one smaller."""
    return [items[start:start + size] for start in range(0, len(items), size)]


# A train source yields, per batch, its size and an iterator of its micro-batches (tokens [b, T, D], labels [b]),
# produced one at a time so that only one micro-batch of clips and tokens is in memory.
Batch = tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]


class CachedBatches:
    """Training batches of cached tokens: each item once per epoch (one of its views at random)."""

    def __init__(self, features: FeatureSet, batch_size: int, micro_batch: int, seed: int, device: torch.device):
        self.features, self.batch_size, self.micro_batch = features, batch_size, micro_batch
        self.seed, self.device, self.labels = seed, device, features.labels

    def __len__(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        views = np.random.RandomState(self.seed + epoch).randint(self.features.num_views, size=len(self.features))
        for items in epoch_batches(len(self.features), self.batch_size, self.seed, epoch):
            yield len(items), ((_tokens(self.features, chunk, views[chunk], self.device),
                                torch.from_numpy(self.features.labels[chunk]).to(self.device))
                               for chunk in split(items, self.micro_batch))


@torch.no_grad()
def predict(probes, features: FeatureSet, device: torch.device, batch_size: int) -> torch.Tensor:
    """Class probabilities [probes, K, C] of every item (one probe: [K, C]): the softmax averaged over its
    spatial views; `batch_size` items (all their views) per forward."""
    single = isinstance(probes, torch.nn.Module)
    probes = [probes] if single else probes
    for p in probes:
        p.eval()
    out = []
    for start in range(0, len(features), batch_size):
        samples = np.arange(start, min(start + batch_size, len(features)))
        tokens = _tokens(features, samples, slice(None), device).flatten(0, 1)  # [B*V, T, D]
        with autocast(device):
            logits = torch.stack([p(tokens).float() for p in probes])
        out.append(logits.softmax(-1).reshape(len(probes), len(samples), features.num_views, -1).mean(2).cpu())
    probs = torch.cat(out, dim=1)
    return probs[0] if single else probs


def fit_probe(name: str, train, val: FeatureSet, *, num_classes: int, num_heads: int,
              settings: ProbeSettings = ProbeSettings(), device: torch.device | str = "cpu",
              csv_path: str | None = None, progress: bool = True, desc: str | None = None) -> ProbeResult:
    """Train probe `name` (one per settings.heads()) on `train` (a FeatureSet of cached tokens, or batches with
    `labels`, `len()` and `epoch(e)` yielding Batch) for settings.epochs, evaluating `val` after each epoch
    (rows to `csv_path`)."""
    device = torch.device(device)
    if isinstance(train, FeatureSet):
        train = CachedBatches(train, settings.batch_size, settings.micro_batch, settings.seed, device)
    if len(train.labels) == 0 or len(val) == 0:
        raise UserError(f"need train and val samples; got {len(train.labels)} usable train and {len(val)} val items")
    bad = [int(x) for x in np.concatenate([train.labels, val.labels]) if not 0 <= x < num_classes]
    if bad:
        raise UserError(f"labels {sorted(set(bad))[:5]} outside [0, {num_classes})")
    heads = settings.heads()
    torch.manual_seed(settings.seed)
    probes = [build_probe(name, val.dim, settings.num_heads or num_heads, num_classes, settings.depth).to(device)
              for _ in heads]
    optimizers = [torch.optim.AdamW([{"params": list(p.parameters())}] if settings.decay_all else param_groups(p))
                  for p in probes]
    scalers = [torch.amp.GradScaler("cuda", enabled=device.type == "cuda") for _ in probes]
    total = settings.epochs * len(train)
    val_labels = torch.from_numpy(val.labels)
    result = ProbeResult(name, top1=float("nan"), top5=None, probes=probes)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc or f"{name} probe", unit="step", disable=not progress, dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        writer = None
        if csv_path:
            writer = csv.DictWriter(stack.enter_context(open(csv_path, "w", newline="")), fieldnames=CSV_FIELDS)
            writer.writeheader()
        step = 0
        for epoch in range(settings.epochs):
            for p in probes:
                p.train()
            loss_sum = torch.zeros(len(probes), device=device)
            correct = torch.zeros(len(probes), device=device)
            seen = 0
            for size, chunks in train.epoch(epoch):
                step += 1
                for optimizer, head in zip(optimizers, heads):
                    for group in optimizer.param_groups:
                        group["lr"] = head.lr_at(step, total, int(head.warmup * len(train)))
                        if not group.get("WD_exclude"):
                            group["weight_decay"] = cosine(head.weight_decay, head.final_weight_decay, step, total)
                for tokens, labels in chunks:  # gradients accumulate to the batch mean's
                    for i, (probe, scaler) in enumerate(zip(probes, scalers)):
                        with autocast(device):
                            logits = probe(tokens)
                        loss = F.cross_entropy(logits.float(), labels)
                        scaler.scale(loss * (len(labels) / size)).backward()
                        loss_sum[i] += loss.detach() * len(labels)
                        correct[i] += (logits.argmax(1) == labels).sum()
                for probe, optimizer, scaler in zip(probes, optimizers, scalers):
                    if settings.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(probe.parameters(), settings.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                seen += size
                bar.update(1)
            loss_sum, correct = loss_sum.cpu(), correct.cpu()
            probs = predict(probes, val, device, settings.micro_batch)  # [heads, K, C]
            top1 = [topk_accuracy(p, val_labels, 1) for p in probs]
            best = int(np.argmax(top1))
            row = {"epoch": epoch + 1, "lr": f"{optimizers[best].param_groups[0]['lr']:.3e}",
                   "weight_decay": f"{optimizers[best].param_groups[0]['weight_decay']:.3e}",
                   "train_loss": f"{loss_sum[best] / seen:.4f}", "train_top1": f"{100 * correct[best] / seen:.2f}",
                   "val_top1": f"{top1[best]:.2f}",
                   "val_top5": f"{topk_accuracy(probs[best], val_labels, 5):.2f}" if num_classes > 5 else "",
                   "best_probe": best, "seconds": f"{time.perf_counter() - t0:.1f}"}
            result.history.append(row)
            bar.set_postfix(loss=row["train_loss"], val_top1=row["val_top1"])
            if writer:
                writer.writerow(row)
    result.top1 = float(result.history[-1]["val_top1"])
    result.top5 = float(result.history[-1]["val_top5"]) if num_classes > 5 else None
    result.seconds = time.perf_counter() - t0
    return result
