import logging
import math

import pytest
import torch
import torch.nn.functional as F

from vjepa_fast.health import HealthMonitor, feature_spread


def _features(token_share: float, seed: int, B=8, N=32, D=48) -> torch.Tensor:
    """Features whose within-clip part has weight `token_share` against a per-clip constant (1 - token_share)."""
    g = torch.Generator().manual_seed(seed)
    per_clip = torch.randn(B, 1, D, generator=g)
    per_token = torch.randn(B, N, D, generator=g)
    return (1 - token_share) * per_clip + token_share * per_token


def test_spreads_split_token_and_clip_variation():
    token, clip = feature_spread(_features(1.0, 0, B=64, N=256))  # iid tokens
    assert token == pytest.approx(1.0, abs=0.02) and clip == pytest.approx(256 ** -0.5, abs=0.01)
    token, clip = feature_spread(_features(0.0, 0))  # every token of a clip alike: full collapse
    assert token == pytest.approx(0.0, abs=1e-3) and clip == pytest.approx(1.0, abs=0.15)
    scaled = feature_spread(_features(0.5, 1) * 7 + 3)  # measured on the layer-normed target: scale-free
    assert scaled == pytest.approx(feature_spread(_features(0.5, 1)), abs=1e-4)
    with pytest.raises(ValueError, match=r"\[2, 1, 8\]"):
        feature_spread(torch.zeros(2, 1, 8))
    one = _features(0.5, 1)[:1]  # a clip-length group of one clip: its token spread, no clip spread
    token, clip = feature_spread(one)
    assert token == pytest.approx(feature_spread(_features(0.5, 1))[0], rel=0.2) and math.isnan(clip)


def _run(monitor, shares, start=0, every=10):
    return [monitor.observe(start + i * every, _features(s, seed=start + i * every)) for i, s in enumerate(shares)]


def test_collapsing_sequence_warns_once(caplog):
    monitor = HealthMonitor(every=10, collapse_fraction=0.6)
    shares = [0.8] * 5 + [0.8 - 0.07 * i for i in range(1, 10)]  # the within-clip share falls steadily
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.health"):
        metrics = _run(monitor, shares)
    warnings = [r for r in caplog.records if r.name == "vjepa_fast.health"]
    assert len(warnings) == 1 and monitor.warned_at is not None
    assert "spread across tokens fell" in warnings[0].getMessage() and "EMA momentum" in warnings[0].getMessage()
    at = monitor.warned_at // 10
    assert metrics[at]["health_token_spread_ratio"] < 0.6 <= metrics[at - 1]["health_token_spread_ratio"]
    assert set(metrics[0]) == {"health_token_spread", "health_clip_spread"}  # no reference yet
    assert metrics[-1]["health_clip_spread"] > 2 * metrics[0]["health_clip_spread"]


def test_healthy_sequence_does_not_warn(caplog):
    monitor = HealthMonitor(every=10)
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.health"):
        metrics = _run(monitor, [0.8] * 30)
    assert not caplog.records and monitor.warned_at is None
    assert all(0.85 < m["health_token_spread_ratio"] < 1.15 for m in metrics[3:])


def test_only_every_kth_step_is_measured():
    monitor = HealthMonitor(every=5)
    assert monitor.observe(3, _features(0.5, 0)) is None and monitor.early == []
    assert monitor.observe(5, _features(0.5, 0)) is not None and monitor.due(10) and not monitor.due(11)


def test_resume_keeps_the_early_value_and_does_not_warn_twice(caplog):
    shares = [0.8] * 4 + [0.3] * 4
    uninterrupted = HealthMonitor(every=10)
    expected = _run(uninterrupted, shares)
    first = HealthMonitor(every=10)
    _run(first, shares[:5])
    resumed = HealthMonitor(every=10)
    resumed.load_state_dict(first.state_dict())
    assert _run(resumed, shares[5:], start=50) == expected[5:]
    assert resumed.warned_at == uninterrupted.warned_at >= 50  # fired after the resume
    again = HealthMonitor(every=10)
    again.load_state_dict(resumed.state_dict())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.health"):
        _run(again, [0.1] * 3, start=80)
    assert not caplog.records


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="collapse_fraction"):
        HealthMonitor(every=10, collapse_fraction=1.5)
    with pytest.raises(ValueError, match="every"):
        HealthMonitor(every=-1)
    assert HealthMonitor(every=0).observe(0, _features(0.5, 0)) is None  # off


def _pretrain(lr: float, momentum: float, steps: int = 40) -> HealthMonitor:
    """A tiny V-JEPA trained on smooth random clips with the monitor watching its target encoder every 5 steps."""
    from helpers import tiny_config
    from vjepa_fast.masks import MaskGenerator
    from vjepa_fast.model import VJEPA

    cfg = tiny_config("data.batch_size=8", "model.embed_dim=48", "model.num_heads=4", "model.pred_embed_dim=32")
    d = cfg.data
    torch.manual_seed(0)
    model = VJEPA(cfg)
    optimizer = torch.optim.AdamW([*model.encoder.parameters(), *model.predictor.parameters()], lr=lr)
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(32, 3 * d.num_frames, 8, 8, generator=g)
    clips = F.interpolate(patterns, size=d.crop_size, mode="bilinear").view(32, 3, d.num_frames, d.crop_size, -1)
    masks = MaskGenerator(cfg.mask, d.crop_size, d.num_frames, d.patch_size, d.tubelet_size)
    monitor = HealthMonitor(every=5)
    for step in range(steps):
        batch = clips[torch.randint(0, 32, (8,), generator=g)]
        if monitor.due(step):
            with torch.no_grad():
                monitor.observe(step, model.target_encoder(batch))
        loss = model.loss(batch, *masks.gen(8, step, generator=g), computation="reference")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(model.target_encoder.parameters()), list(model.encoder.parameters()),
                                 1 - momentum)
    return monitor


def test_a_collapsing_pretraining_run_is_caught_and_a_healthy_one_is_not(caplog):
    with caplog.at_level(logging.WARNING, logger="vjepa_fast.health"):
        healthy = _pretrain(lr=1e-4, momentum=0.998)
        assert not caplog.records and healthy.warned_at is None
        collapsing = _pretrain(lr=3e-3, momentum=0.9)  # lr too high for the batch, EMA too fast
    assert collapsing.warned_at is not None and len(caplog.records) == 1
