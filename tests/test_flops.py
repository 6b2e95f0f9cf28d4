import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import register_cpu_sdpa_flops, step_flops
from helpers import tiny_batch, tiny_config
from vjepa_fast.config import load_config
from vjepa_fast.model import VJEPA


def test_vitl16_step_is_about_60_tflop():
    flops = step_flops(load_config("vitl16"), ctx_lengths=[368, 112], tgt_lengths=[760, 1120])
    # DESIGN section 6 rounds these: target ~29, context ~21, predictor ~11
    assert flops.target / 1e12 == pytest.approx(29, rel=0.1)
    assert flops.context / 1e12 == pytest.approx(21, rel=0.1)
    assert flops.predictor / 1e12 == pytest.approx(11, rel=0.1)
    assert flops.total / 1e12 == pytest.approx(60, rel=0.05)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_analytic_count_matches_torch_flop_counter(backend):
    cfg = tiny_config(f"model.attn_backend={backend}", "model.embed_dim=64", "model.num_heads=4",
                      "model.pred_embed_dim=32", "data.crop_size=64", "data.patch_size=16", "data.num_frames=8")
    torch.manual_seed(0)
    model = VJEPA(cfg)
    clips, enc, pred = tiny_batch(cfg)
    register_cpu_sdpa_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(clips, enc, pred, path="fast").backward()
    measured = counter.get_total_flops()
    analytic = step_flops(cfg, [m.size(1) for m in enc], [m.size(1) for m in pred]).total
    assert analytic == pytest.approx(measured, rel=0.05)
