"""The frozen-evaluation protocol: train a probe on cached tokens, report top-1/top-5 on the val set per epoch.

Optimisation as the paper's Table 6 and the official eval: AdamW, lr 1e-3 cosine to 0 per step without warmup,
weight decay 0.01 (not on biases and 1-D parameters), gradient norm clipped at 1, 20 epochs. Each spatial view of
a training item is a training sample; a val item's prediction is the mean of its views' softmax (multi-view eval).
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..optim import param_groups
from .features import FeatureSet
from .probe import build_probe

CSV_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5", "seconds"]


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int = 20
    lr: float = 1e-3
    final_lr: float = 0.0
    weight_decay: float = 0.01
    batch_size: int = 256
    clip_grad: float = 1.0
    seed: int = 0


@dataclass
class ProbeResult:
    probe: str
    top1: float  # val top-1 (%) after the last epoch
    top5: float | None  # val top-5 (%) when there are more than 5 classes
    history: list[dict] = field(default_factory=list)  # the CSV rows
    seconds: float = 0.0


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """% of rows of scores [M, C] whose label is among their k highest scores."""
    top = scores.topk(min(k, scores.size(1)), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def _tokens(features: FeatureSet, samples: np.ndarray, views: np.ndarray | slice, device) -> torch.Tensor:
    """float32 tokens of samples (indices into features.rows) at `views`, on `device`."""
    return torch.from_numpy(np.ascontiguousarray(features.tokens[features.rows[samples], views])).to(device).float()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(probe: torch.nn.Module, features: FeatureSet, device: torch.device, batch_size: int) -> torch.Tensor:
    """Class probabilities [K, C] of every item: the softmax averaged over its spatial views."""
    probe.eval()
    out = []
    for start in range(0, len(features), batch_size):
        samples = np.arange(start, min(start + batch_size, len(features)))
        tokens = _tokens(features, samples, slice(None), device)  # [B, V, T, D]
        with _autocast(device):
            logits = probe(tokens.flatten(0, 1)).float()
        out.append(logits.softmax(-1).reshape(len(samples), features.num_views, -1).mean(1).cpu())
    return torch.cat(out)


def cosine_lr(settings: ProbeSettings, step: int, total: int) -> float:
    """lr at `step` of `total`: cosine from settings.lr to settings.final_lr, no warmup."""
    return settings.final_lr + (settings.lr - settings.final_lr) * 0.5 * (1 + math.cos(math.pi * step / total))


def fit_probe(name: str, train: FeatureSet, val: FeatureSet, *, num_classes: int, num_heads: int,
              settings: ProbeSettings = ProbeSettings(), device: torch.device | str = "cpu",
              csv_path: str | None = None, progress: bool = True, desc: str | None = None) -> ProbeResult:
    """Train probe `name` on `train` for settings.epochs, evaluating `val` after each epoch (rows to `csv_path`)."""
    device = torch.device(device)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"need train and val samples; got {len(train)} usable train and {len(val)} val items")
    bad = [int(x) for x in np.concatenate([train.labels, val.labels]) if not 0 <= x < num_classes]
    if bad:
        raise UserError(f"labels {sorted(set(bad))[:5]} outside [0, {num_classes})")
    torch.manual_seed(settings.seed)
    probe = build_probe(name, train.dim, num_heads, num_classes).to(device)
    optimizer = torch.optim.AdamW(param_groups(probe), lr=settings.lr, weight_decay=settings.weight_decay)
    samples = len(train) * train.num_views  # (item, view) pairs
    batches = max(1, samples // settings.batch_size)  # balanced batches, none smaller than batch_size
    total = settings.epochs * batches
    shuffle = torch.Generator().manual_seed(settings.seed)
    val_labels = torch.from_numpy(val.labels)
    result = ProbeResult(name, top1=float("nan"), top5=None)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc or f"{name} probe", unit="step", disable=not progress, dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        writer = None
        if csv_path:
            writer = csv.DictWriter(stack.enter_context(open(csv_path, "w", newline="")), fieldnames=CSV_FIELDS)
            writer.writeheader()
        step = 0
        for epoch in range(1, settings.epochs + 1):
            probe.train()
            loss_sum, correct = 0.0, 0
            for batch in torch.tensor_split(torch.randperm(samples, generator=shuffle), batches):
                lr = cosine_lr(settings, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                items, views = np.divmod(batch.numpy(), train.num_views)
                labels = torch.from_numpy(train.labels[items]).to(device)
                with _autocast(device):
                    logits = probe(_tokens(train, items, views, device)).float()
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(probe.parameters(), settings.clip_grad)
                optimizer.step()
                loss_sum += loss.item() * len(batch)
                correct += (logits.argmax(1) == labels).sum().item()
                step += 1
                bar.update(1)
            probs = predict(probe, val, device, settings.batch_size)
            top5 = f"{topk_accuracy(probs, val_labels, 5):.2f}" if num_classes > 5 else ""
            row = {"epoch": epoch, "lr": f"{lr:.3e}", "train_loss": f"{loss_sum / samples:.4f}",
                   "train_top1": f"{100 * correct / samples:.2f}",
                   "val_top1": f"{topk_accuracy(probs, val_labels, 1):.2f}", "val_top5": top5,
                   "seconds": f"{time.perf_counter() - t0:.1f}"}
            result.history.append(row)
            bar.set_postfix(loss=row["train_loss"], val_top1=row["val_top1"])
            if writer:
                writer.writerow(row)
    result.top1 = float(result.history[-1]["val_top1"])
    result.top5 = float(result.history[-1]["val_top5"]) if num_classes > 5 else None
    result.seconds = time.perf_counter() - t0
    return result
