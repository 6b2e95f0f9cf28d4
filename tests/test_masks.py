import collections
import itertools
import math
import statistics

import pytest
import torch

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


def official_block_size(cfg: MaskConfig, step: int, duration: int, height: int, width: int):
    """The official V-JEPA draw of one batch's block size (multiblock3d.py _sample_block_size), seeded by the step."""
    g = torch.Generator().manual_seed(step)

    def uniform(low_high):
        low, high = low_high
        return low + torch.rand(1, generator=g).item() * (high - low)

    t = max(1, int(duration * uniform(cfg.temporal_scale)))
    keep = int(height * width * uniform(cfg.spatial_scale))
    ar = uniform(cfg.aspect_ratio)
    return t, min(int(round(math.sqrt(keep * ar))), height), min(int(round(math.sqrt(keep / ar))), width)


def official_masks(cfg: MaskConfig, step: int, duration: int, height: int, width: int, batch: int, generator):
    """The official per-sample loop (multiblock3d.py __call__): a context mask is the product of num_blocks masks
    with one block zeroed each (and the time steps past max_temporal_keep); an empty context is drawn again;
    index lists cut to the batch minimum (the context's also to max_keep)."""
    t, h, w = official_block_size(cfg, step, duration, height, width)
    max_context = max(1, int(duration * cfg.max_temporal_keep))
    enc, pred = [], []
    for _ in range(batch):
        keep = torch.zeros(1)
        while not keep.any():
            keep = torch.ones((duration, height, width), dtype=torch.int32)
            for _ in range(cfg.num_blocks):
                top = torch.randint(0, height - h + 1, (1,), generator=generator)
                left = torch.randint(0, width - w + 1, (1,), generator=generator)
                start = torch.randint(0, duration - t + 1, (1,), generator=generator)
                block = torch.ones((duration, height, width), dtype=torch.int32)
                block[start:start + t, top:top + h, left:left + w] = 0
                if max_context < duration:
                    block[max_context:] = 0
                keep *= block
            keep = keep.flatten()
        enc.append(torch.nonzero(keep).squeeze(1))
        pred.append(torch.argwhere(keep == 0).squeeze(1))
    k_enc = min(len(e) for e in enc) if cfg.max_keep is None else min(cfg.max_keep, *(len(e) for e in enc))
    k_pred = min(len(p) for p in pred)
    return torch.stack([e[:k_enc] for e in enc]), torch.stack([p[:k_pred] for p in pred])


def _ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = torch.tensor(sorted(a), dtype=torch.float64), torch.tensor(sorted(b), dtype=torch.float64)
    points = torch.cat([a, b])
    cdf = [torch.searchsorted(x, points, right=True) / len(x) for x in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


@pytest.mark.parametrize("crop, frames", [(224, 16), (256, 16), (384, 16), (256, 64)])
def test_block_sizes_are_the_official_draw(crop, frames):
    cfgs = load_config("vitl16").mask + [MaskConfig(num_blocks=1, temporal_scale=(0.3, 0.9), spatial_scale=(0.1, 0.9),
                                                    aspect_ratio=(0.3, 3.0))]
    gen = MaskGenerator(cfgs, crop, frames, 16, 2)
    for cfg in gen.cfgs:
        for step in range(300):
            assert gen.block_size(cfg, step) == official_block_size(cfg, step, frames // 2, crop // 16, crop // 16)


def test_a_sample_s_masks_follow_the_exact_distribution():
    """Every (predicted region) outcome of one sample, its probability enumerated over all block positions
    (2 blocks of 1x3x2 on a 2x4x4 grid: 144 equally likely placements), against 3000 draws: a chi-square test."""
    cfg = MaskConfig(num_blocks=2, temporal_scale=(0.5, 0.5), spatial_scale=(6 / 16, 6 / 16), aspect_ratio=(1.5, 1.5))
    gen = MaskGenerator([cfg], 64, 4, 16, 2)
    t, h, w = official_block_size(cfg, 0, 2, 4, 4)
    assert gen.block_size(gen.cfgs[0], 0) == (t, h, w) == (1, 3, 2)
    exact = collections.Counter()
    placements = list(itertools.product(range(2 - t + 1), range(4 - h + 1), range(4 - w + 1)))
    for blocks in itertools.product(placements, repeat=cfg.num_blocks):
        region = torch.zeros(2, 4, 4, dtype=torch.bool)
        for start, top, left in blocks:
            region[start:start + t, top:top + h, left:left + w] = True
        exact[tuple(region.flatten().nonzero().squeeze(1).tolist())] += 1
    g = torch.Generator().manual_seed(0)
    draws = 3000
    seen = collections.Counter(tuple(gen.gen(1, 0, generator=g)[1][0][0].tolist()) for _ in range(draws))
    assert set(seen) <= set(exact)
    total = sum(exact.values())
    expected = {region: draws * n / total for region, n in exact.items()}
    assert min(expected.values()) >= 5  # the chi-square approximation holds
    chi2 = sum((seen[region] - e) ** 2 / e for region, e in expected.items())
    dof = len(exact) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)).item()
    assert p_value > 1e-3, f"chi-square {chi2:.1f} on {dof} degrees of freedom"


def test_batch_token_counts_have_the_official_loop_s_distribution():
    """The context and prediction lengths of a batch (the batch minima: what the step's cost depends on) from the
    vectorised generator and from the official per-sample loop, over 100 steps (100 block sizes) of batch 16:
    two-sample Kolmogorov-Smirnov at the 0.1% level."""
    gen = _official_generator()
    g_fast, g_loop = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    lengths = {"fast": collections.defaultdict(list), "loop": collections.defaultdict(list)}
    steps, batch = 100, 16
    for step in range(steps):
        fast = gen.gen(batch, step, generator=g_fast)
        loop = [official_masks(cfg, step, 8, 14, 14, batch, g_loop) for cfg in gen.cfgs]
        for i in range(len(gen.cfgs)):
            for kind, (enc, pred) in (("fast", (fast[0][i], fast[1][i])), ("loop", loop[i])):
                assert enc.shape[0] == pred.shape[0] == batch
                lengths[kind][f"enc{i}"].append(enc.shape[1])
                lengths[kind][f"pred{i}"].append(pred.shape[1])
    critical = 1.95 * math.sqrt(2 / steps)  # alpha = 0.001
    for key, fast in lengths["fast"].items():
        assert _ks_distance(fast, lengths["loop"][key]) < critical, key


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
    # 2 blocks of 3 rows x 2 columns on a 3x3 grid (one time step): placed at columns (0, 1) or (1, 0) they cover
    # everything (half the draws), both at 0 or both at 1 they leave column 2 or column 0 as the context.
    cfg = [MaskConfig(num_blocks=2, spatial_scale=(6 / 9, 6 / 9), aspect_ratio=(1.5, 1.5))]
    gen = MaskGenerator(cfg, 48, 2, 16, 2)
    assert gen.block_size(gen.cfgs[0], 0) == (1, 3, 2)
    draws = []
    draw = gen._predicted
    gen._predicted = lambda *args: draws.append(draw(*args)) or draws[-1]
    enc, pred = gen.gen(32, 0, generator=torch.Generator().manual_seed(0))
    assert (draws[0].sum(dim=1) == 9).any() and len(draws) > 1  # the first draw left samples without context
    assert enc[0].shape == (32, 3) and pred[0].shape == (32, 6)
    columns = {tuple(row) for row in enc[0].tolist()}
    assert columns == {(0, 3, 6), (2, 5, 8)}  # every sample keeps one whole column, either one
    impossible = MaskGenerator([MaskConfig(num_blocks=1, spatial_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))],
                               48, 2, 16, 2)
    with pytest.raises(RuntimeError, match="no context"):
        impossible.gen(2, 0)


@pytest.mark.gpu
def test_runs_on_cuda():
    gen = _official_generator()
    enc, pred = gen.gen(24, 0, device="cuda")
    assert enc[0].device.type == "cuda" and pred[1].device.type == "cuda"
