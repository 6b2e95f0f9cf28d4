import csv
import math

import numpy as np
import pytest
import torch

from vjepa_fast.eval.features import FeatureSet
from vjepa_fast.eval.probe import build_probe
from vjepa_fast.eval.protocols import CachedBatches, HeadSettings, ProbeSettings, fit_probe, topk_accuracy


def _separable(n, classes, seed, views=1, tokens=6, dim=16):
    """Noise tokens plus a class-specific direction on every token."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    directions = np.random.default_rng(99).normal(size=(classes, 1, 1, dim))
    x = rng.normal(size=(n, views, tokens, dim)) + directions[labels]
    return FeatureSet(x.astype(np.float16), np.arange(n), labels.astype(np.int64), path="")


# -- plain transcriptions of the official optimisation (jepa/src/utils/schedulers.py, jepa/evals/
# video_classification_frozen/eval.py init_opt + run_one_epoch on the CPU, vjepa2/evals/video_classification_frozen/
# eval.py init_opt, WarmupCosineLRSchedule, CosineWDSchedule, run_one_epoch) --
class _WarmupCosineSchedule:
    def __init__(self, optimizer, warmup_steps, start_lr, ref_lr, T_max, final_lr=0.):
        self.optimizer, self.start_lr, self.ref_lr, self.final_lr = optimizer, start_lr, ref_lr, final_lr
        self.warmup_steps, self.T_max, self._step = warmup_steps, T_max - warmup_steps, 0.

    def step(self):
        self._step += 1
        if self._step < self.warmup_steps:
            progress = float(self._step) / float(max(1, self.warmup_steps))
            new_lr = self.start_lr + progress * (self.ref_lr - self.start_lr)
        else:
            progress = float(self._step - self.warmup_steps) / float(max(1, self.T_max))
            new_lr = max(self.final_lr,
                         self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1. + math.cos(math.pi * progress)))
        for group in self.optimizer.param_groups:
            group['lr'] = new_lr


class _CosineWDSchedule:
    def __init__(self, optimizer, ref_wd, T_max, final_wd=0.):
        self.optimizer, self.ref_wd, self.final_wd, self.T_max, self._step = optimizer, ref_wd, final_wd, T_max, 0.

    def step(self):
        self._step += 1
        progress = self._step / self.T_max
        new_wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1. + math.cos(math.pi * progress))
        new_wd = max(self.final_wd, new_wd) if self.final_wd <= self.ref_wd else min(self.final_wd, new_wd)
        for group in self.optimizer.param_groups:
            if ('WD_exclude' not in group) or not group['WD_exclude']:
                group['weight_decay'] = new_wd


def _official_v1_loop(classifier, batches, ipe, num_epochs, wd, lr, final_lr):
    param_groups = [
        {'params': (p for n, p in classifier.named_parameters() if ('bias' not in n) and (len(p.shape) != 1))},
        {'params': (p for n, p in classifier.named_parameters() if ('bias' in n) or (len(p.shape) == 1)),
         'WD_exclude': True, 'weight_decay': 0}]
    optimizer = torch.optim.AdamW(param_groups)
    scheduler = _WarmupCosineSchedule(optimizer, 0, lr, lr, int(num_epochs * ipe), final_lr=final_lr)
    wd_scheduler = _CosineWDSchedule(optimizer, wd, int(num_epochs * ipe), final_wd=1e-6)  # init_opt's default
    for epoch in range(num_epochs):
        for x, labels in batches(epoch):
            scheduler.step()
            wd_scheduler.step()
            loss = torch.nn.CrossEntropyLoss()(classifier(x), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()


def _official_v2_loop(classifiers, batches, ipe, num_epochs, opt_kwargs):
    optimizers = [torch.optim.AdamW([{"params": (p for n, p in c.named_parameters()),
                                      "mc_warmup_steps": int(kw["warmup"] * ipe), "mc_start_lr": kw["start_lr"],
                                      "mc_ref_lr": kw["lr"], "mc_final_lr": kw["final_lr"],
                                      "mc_ref_wd": kw["weight_decay"], "mc_final_wd": kw["final_weight_decay"]}])
                  for c, kw in zip(classifiers, opt_kwargs)]
    T_max, step = int(num_epochs * ipe), 0.
    for epoch in range(num_epochs):
        for x, labels in batches(epoch):
            step += 1
            for o in optimizers:
                for group in o.param_groups:
                    warmup_steps = group["mc_warmup_steps"]
                    if step < warmup_steps:
                        progress = float(step) / float(max(1, warmup_steps))
                        group["lr"] = group["mc_start_lr"] + progress * (group["mc_ref_lr"] - group["mc_start_lr"])
                    else:
                        progress = float(step - warmup_steps) / float(max(1, T_max - warmup_steps))
                        group["lr"] = max(group["mc_final_lr"], group["mc_final_lr"] + (
                            group["mc_ref_lr"] - group["mc_final_lr"]) * 0.5 * (1.0 + math.cos(math.pi * progress)))
                    ref_wd, final_wd = group["mc_ref_wd"], group["mc_final_wd"]
                    new_wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * step / T_max))
                    group["weight_decay"] = max(final_wd, new_wd) if final_wd <= ref_wd else min(final_wd, new_wd)
            losses = [torch.nn.CrossEntropyLoss()(c(x), labels) for c in classifiers]
            [loss.backward() for loss in losses]
            [o.step() for o in optimizers]
            [o.zero_grad() for o in optimizers]


def _sampler_batches(features, batch_size):
    """DistributedSampler(shuffle, seed 0, set_epoch) on one rank + DataLoader(drop_last=False)."""
    def batches(epoch):
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, len(order), batch_size):
            items = order[start:start + batch_size]
            yield (torch.from_numpy(features.tokens[items, 0].astype(np.float32)),
                   torch.from_numpy(features.labels[items]))
    return batches


def test_v1_probe_training_is_the_official_loop():
    train, val = _separable(22, 4, seed=0), _separable(8, 4, seed=1)
    settings = ProbeSettings(epochs=3, batch_size=8, micro_batch=8, head=HeadSettings(lr=3e-2))
    ours = fit_probe("attentive", train, val, num_classes=4, num_heads=2, settings=settings, progress=False)
    torch.manual_seed(0)
    official = build_probe("attentive", 16, 2, 4)  # the same initial weights
    _official_v1_loop(official, _sampler_batches(train, 8), ipe=3, num_epochs=3, wd=0.01, lr=3e-2, final_lr=0.0)
    for (name, a), b in zip(ours.probes[0].state_dict().items(), official.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert float(ours.history[-1]["weight_decay"]) == pytest.approx(1e-6)  # cosine 0.01 -> 1e-6


def test_v2_sweep_trains_every_probe_as_the_official_multihead_loop():
    train, val = _separable(22, 4, seed=0), _separable(8, 4, seed=1)
    sweep = (HeadSettings(lr=3e-2, final_lr=0.0, weight_decay=0.01, final_weight_decay=0.01, start_lr=3e-2),
             HeadSettings(lr=1e-3, final_lr=1e-4, weight_decay=0.4, final_weight_decay=0.1, start_lr=2e-4,
                          warmup=1))  # the ViT-g configs' warmup: 1 epoch here
    settings = ProbeSettings(epochs=2, batch_size=8, micro_batch=8, sweep=sweep, depth=2, clip_grad=None,
                             decay_all=True)
    ours = fit_probe("attentive", train, val, num_classes=4, num_heads=2, settings=settings, progress=False)
    torch.manual_seed(0)
    official = [build_probe("attentive", 16, 2, 4, depth=2) for _ in sweep]
    _official_v2_loop(official, _sampler_batches(train, 8), ipe=3, num_epochs=2,
                      opt_kwargs=[vars(h) for h in sweep])
    for probe, reference in zip(ours.probes, official):
        for (name, a), b in zip(probe.state_dict().items(), reference.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
    with torch.no_grad():  # the reported number: the best probe's val top-1
        x = torch.from_numpy(val.tokens[:, 0].astype(np.float32))
        top1 = [topk_accuracy(p.eval()(x).softmax(-1), torch.from_numpy(val.labels), 1) for p in official]
    assert ours.top1 == pytest.approx(max(top1), abs=0.01) and ours.history[-1]["best_probe"] == int(np.argmax(top1))


@pytest.mark.parametrize("v2", [False, True])
def test_micro_batches_accumulate_to_the_whole_batch_gradient(v2):
    """A batch of 8 in micro-batches of 3, 3 and 2 (the last batch: 3 and 3) trains the same probes as the
    whole batch at once: each micro-batch's loss counts by its share of the batch, as DDP averages over GPUs."""
    train, val = _separable(22, 4, seed=0), _separable(8, 4, seed=1)
    sweep = (HeadSettings(lr=3e-2), HeadSettings(lr=1e-3, weight_decay=0.1)) if v2 else ()
    kw = dict(epochs=2, batch_size=8, head=HeadSettings(lr=3e-2), sweep=sweep, depth=2 if v2 else 1,
              clip_grad=None if v2 else 1.0, decay_all=v2)
    whole, chunked = [fit_probe("attentive", train, val, num_classes=4, num_heads=2, progress=False,
                                settings=ProbeSettings(micro_batch=micro, **kw)) for micro in (8, 3)]
    for a, b in zip(whole.probes, chunked.probes):
        for (name, x), y in zip(_without_key_bias(a).items(), _without_key_bias(b).values()):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=name)  # fp32 rounding through Adam
        tokens = torch.from_numpy(val.tokens[:, 0].astype(np.float32))
        torch.testing.assert_close(b.eval()(tokens), a.eval()(tokens), rtol=1e-5, atol=1e-5)
    for x, y in zip(whole.history, chunked.history):
        assert float(x["train_loss"]) == pytest.approx(float(y["train_loss"]), abs=2e-4)


def _without_key_bias(probe):
    """The state dict less the attention key biases: the softmax ignores them, so their gradient is rounding
    noise, which Adam scales to full steps; they do not change the logits."""
    state = dict(probe.state_dict())
    dim = state["query"].size(-1)
    state["xattn.kv.bias"] = state["xattn.kv.bias"][dim:]
    for name in [n for n in state if n.endswith("attn.qkv.bias")]:
        state[name] = torch.cat([state[name][:dim], state[name][2 * dim:]])
    return state


def test_one_sample_per_item_not_per_view():
    features = _separable(20, 4, seed=0, views=3)
    batches = CachedBatches(features, batch_size=8, micro_batch=3, seed=0, device=torch.device("cpu"))
    assert len(batches) == 3
    sizes = [(size, [len(labels) for _, labels in chunks]) for size, chunks in batches.epoch(0)]
    assert sizes == [(8, [3, 3, 2]), (8, [3, 3, 2]), (4, [3, 1])]


@pytest.mark.parametrize("name", ["attentive", "linear"])
def test_probe_learns_a_separable_task_and_logs_every_epoch(tmp_path, name):
    train, val = _separable(96, 6, seed=0, views=2), _separable(48, 6, seed=1, views=2)
    settings = ProbeSettings(epochs=4, batch_size=16, micro_batch=16, head=HeadSettings(lr=1e-2), seed=0)
    result = fit_probe(name, train, val, num_classes=6, num_heads=2, settings=settings,
                       csv_path=str(tmp_path / "p.csv"), progress=False)
    assert result.top1 >= 80 and result.top5 == 100  # chance: 16.7
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_top1"]) == result.top1
    assert float(rows[0]["train_loss"]) > float(rows[-1]["train_loss"])
    assert float(rows[-1]["lr"]) < 0.05 * settings.head.lr  # cosine to 0


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
