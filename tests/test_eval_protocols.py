import csv

import numpy as np
import pytest
import torch

from vjepa_fast.eval.features import FeatureSet
from vjepa_fast.eval.protocols import ProbeSettings, fit_probe, topk_accuracy


def _separable(n, classes, seed, views=1, tokens=6, dim=16):
    """Noise tokens plus a class-specific direction on every token."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    directions = np.random.default_rng(99).normal(size=(classes, 1, 1, dim))
    x = rng.normal(size=(n, views, tokens, dim)) + directions[labels]
    return FeatureSet(x.astype(np.float16), np.arange(n), labels.astype(np.int64), path="")


@pytest.mark.parametrize("name", ["attentive", "linear"])
def test_probe_learns_a_separable_task_and_logs_every_epoch(tmp_path, name):
    train, val = _separable(96, 6, seed=0, views=2), _separable(48, 6, seed=1, views=2)
    settings = ProbeSettings(epochs=4, batch_size=16, lr=1e-2, seed=0)
    result = fit_probe(name, train, val, num_classes=6, num_heads=2, settings=settings,
                       csv_path=str(tmp_path / "p.csv"), progress=False)
    assert result.top1 >= 80 and result.top5 == 100  # chance: 16.7
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_top1"]) == result.top1
    assert float(rows[0]["train_loss"]) > float(rows[-1]["train_loss"])
    assert float(rows[-1]["lr"]) < 0.05 * settings.lr  # cosine to 0


def test_top5_only_above_five_classes_and_runs_are_seeded():
    train, val = _separable(40, 4, seed=0), _separable(20, 4, seed=1)
    settings = ProbeSettings(epochs=2, batch_size=8)
    a = fit_probe("attentive", train, val, num_classes=4, num_heads=2, settings=settings, progress=False)
    b = fit_probe("attentive", train, val, num_classes=4, num_heads=2, settings=settings, progress=False)
    assert a.top5 is None and a.history[-1]["val_top5"] == ""
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_labels_outside_the_classes_are_named():
    train = _separable(8, 3, seed=0)
    with pytest.raises(ValueError, match=r"labels \[2\] outside \[0, 2\)"):
        fit_probe("linear", train, train, num_classes=2, num_heads=2, progress=False)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.8, 0.15, 0.05]])
    labels = torch.tensor([2, 0])
    assert topk_accuracy(scores, labels, 1) == 50.0
    assert topk_accuracy(scores, labels, 2) == 100.0
