import pytest
import torch

from vjepa_fast.config import load_config
from vjepa_fast.optim import Schedule, apply_schedule, build_optimizer, param_groups


def test_vitl16_schedules_give_the_official_values():
    s = Schedule.from_config(load_config("vitl16").optimization)
    assert s.total == 112_500 and s.warmup_steps == 12_000
    assert s.lr(1) == pytest.approx(2.0004e-4, rel=1e-4)
    assert s.lr(12_000) == pytest.approx(6.25e-4, rel=1e-6)
    assert s.lr(45_000) == pytest.approx(4.732e-4, rel=1e-4)
    assert s.lr(90_000) == pytest.approx(7.504e-5, rel=1e-4)
    assert s.wd(1) == pytest.approx(0.04, rel=1e-6)
    assert s.wd(45_000) == pytest.approx(0.1644, rel=1e-3)
    assert s.wd(90_000) == pytest.approx(0.3656, rel=1e-3)
    assert s.momentum(0) == 0.998
    assert s.momentum(90_000) == pytest.approx(0.9996, rel=1e-9)
    assert s.lr(112_500) == pytest.approx(1e-6) and s.wd(112_500) == pytest.approx(0.4)


def test_weight_decay_groups_exclude_biases_and_1d_params():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    extra = torch.nn.Linear(4, 2)
    groups = param_groups(net, extra)
    assert [len(g["params"]) for g in groups] == [1, 1, 3, 1]
    assert all(p.dim() > 1 for g in groups[:2] for p in g["params"])
    opt = build_optimizer(load_config("demo").optimization, net, extra)
    apply_schedule(opt, lr=0.5, wd=0.25)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.25, 0.25, 0.0, 0.0]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
