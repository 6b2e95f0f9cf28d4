import statistics

import pytest
import torch

from bench.masks import LoopMaskGenerator
from vjepa_fast.config import MaskConfig, load_config
from vjepa_fast.masks import MaskGenerator


def _official_generator(batch_crop=224, frames=16):
    cfg = load_config("vitl16")
    return MaskGenerator(cfg.mask, batch_crop, frames, 16, 2)


def test_shapes_sorted_disjoint_and_in_range():
    gen = _official_generator()
    enc, pred = gen.gen(24, step=3, generator=torch.Generator().manual_seed(1))
    assert len(enc) == len(pred) == 2
    for e, p in zip(enc, pred):
        assert e.dtype == p.dtype == torch.int64 and e.shape[0] == p.shape[0] == 24
        for idx in (e, p):
            assert torch.all(idx[:, 1:] > idx[:, :-1]) and idx.min() >= 0 and idx.max() < 1568
        for b in range(24):
            assert not set(e[b].tolist()) & set(p[b].tolist())


def test_block_size_follows_the_official_rounding():
    gen = _official_generator()
    cfg = gen.cfgs[0]
    g = torch.Generator().manual_seed(7)
    r_t, r_s, r_ar = (torch.rand(1, generator=g).item() for _ in range(3))
    ar = 0.75 + r_ar * 0.75
    keep = int(196 * 0.15)
    assert gen.block_size(cfg, 7) == (8, min(14, round((keep * ar) ** 0.5)), min(14, round((keep / ar) ** 0.5)))


def test_lowest_truncation_predicted_region_is_a_union_of_full_time_blocks():
    gen = _official_generator()
    enc, pred = gen.gen(4, step=0, generator=torch.Generator().manual_seed(0))
    for b in range(4):
        # temporal scale 1: every block spans all 8 time steps, so the region repeats over time
        full = torch.zeros(1568, dtype=torch.bool)
        full[pred[1][b]] = True
        t0 = full.view(8, 196)[0]
        kept = full.view(8, 196)
        assert torch.equal(kept[: pred[1].shape[1] // 196], t0.expand(pred[1].shape[1] // 196, -1))


def test_mask_statistics_match_the_official_code():
    gen = _official_generator()
    g = torch.Generator().manual_seed(0)
    counts = {k: [] for k in ("enc0", "pred0", "enc1", "pred1")}
    for step in range(150):
        enc, pred = gen.gen(24, step, generator=g)
        for i in range(2):
            counts[f"enc{i}"].append(enc[i].shape[1])
            counts[f"pred{i}"].append(pred[i].shape[1])
    # docs/design.md section 4: measured on the official code at 224 px / 16 frames / batch 24
    expected = {"enc0": 368, "pred0": 760, "enc1": 112, "pred1": 1120}
    for key, value in expected.items():
        assert statistics.median(counts[key]) == pytest.approx(value, rel=0.10), key
    assert 136 * 0.8 <= min(counts["enc0"]) and max(counts["enc0"]) <= 560 * 1.2


def test_vectorised_and_loop_generators_have_the_same_distribution():
    fast, loop = _official_generator(), LoopMaskGenerator(load_config("vitl16").mask, 224, 16, 16, 2)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    f = [fast.gen(24, s, generator=g1) for s in range(20)]
    lo = [loop.gen(24, s, generator=g2) for s in range(20)]
    for i in range(2):
        mean_f = statistics.mean(x[1][i].shape[1] for x in f)
        mean_l = statistics.mean(x[1][i].shape[1] for x in lo)
        assert mean_f == pytest.approx(mean_l, rel=0.1)


def test_same_step_and_seed_give_the_same_masks():
    gen = _official_generator()
    a = gen.gen(8, 5, generator=torch.Generator().manual_seed(3))
    b = gen.gen(8, 5, generator=torch.Generator().manual_seed(3))
    c = gen.gen(8, 6, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a[1], c[1]))


def test_random_truncation_keeps_a_sorted_random_subset():
    cfg = [MaskConfig(num_blocks=2, spatial_scale=(0.7, 0.7), truncation="random")]
    gen = MaskGenerator(cfg, 224, 16, 16, 2)
    lowest = MaskGenerator([MaskConfig(num_blocks=2, spatial_scale=(0.7, 0.7))], 224, 16, 16, 2)
    enc_r, pred_r = gen.gen(16, 2, generator=torch.Generator().manual_seed(0))
    enc_l, pred_l = lowest.gen(16, 2, generator=torch.Generator().manual_seed(0))
    assert enc_r[0].shape == enc_l[0].shape and pred_r[0].shape == pred_l[0].shape
    assert torch.all(enc_r[0][:, 1:] > enc_r[0][:, :-1])
    # The lowest cut never keeps late time steps when rows are long; the random cut does.
    assert enc_r[0].max() > enc_l[0].max() or pred_r[0].max() > pred_l[0].max()


def test_max_temporal_keep_and_max_keep():
    cfg = [MaskConfig(num_blocks=1, spatial_scale=(0.15, 0.15), max_temporal_keep=0.5, max_keep=20)]
    gen = MaskGenerator(cfg, 64, 8, 16, 2)  # 4 x 4 x 4 tokens
    enc, pred = gen.gen(6, 0, generator=torch.Generator().manual_seed(0))
    assert enc[0].shape[1] <= 20
    assert enc[0].max() < 2 * 16  # context only in the first half of the time steps
    assert set(range(32, 64)) <= set(pred[0][0].tolist())


def test_empty_context_is_redrawn():
    # 1 block of 3x3 or bigger on a 3x3 grid covers everything unless the aspect ratio shrinks one side.
    cfg = [MaskConfig(num_blocks=1, spatial_scale=(0.9, 0.9), aspect_ratio=(0.5, 0.5))]
    gen = MaskGenerator(cfg, 48, 2, 16, 2)
    enc, pred = gen.gen(32, 0, generator=torch.Generator().manual_seed(0))
    assert enc[0].shape[1] >= 1
    impossible = MaskGenerator([MaskConfig(num_blocks=1, spatial_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))],
                               48, 2, 16, 2)
    with pytest.raises(RuntimeError, match="no context"):
        impossible.gen(2, 0)


@pytest.mark.gpu
def test_runs_on_cuda():
    gen = _official_generator()
    enc, pred = gen.gen(24, 0, device="cuda")
    assert enc[0].device.type == "cuda" and pred[1].device.type == "cuda"
