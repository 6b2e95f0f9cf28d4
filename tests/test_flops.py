import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_batch, tiny_config
from vjepa_fast.bench.flops import register_cpu_sdpa_flops, step_flops
from vjepa_fast.config import load_config
from vjepa_fast.model import VJEPA


def test_vitl16_step_is_about_60_tflop():
    flops = step_flops(load_config("vitl16"), ctx_lengths=[368, 112], tgt_lengths=[760, 1120])
    # docs/design.md rounds these: target ~29, context ~21, predictor ~11
    assert flops.target.total / 1e12 == pytest.approx(29, rel=0.1)
    assert flops.context.total / 1e12 == pytest.approx(21, rel=0.1)
    assert flops.predictor.total / 1e12 == pytest.approx(11, rel=0.1)
    assert flops.total / 1e12 == pytest.approx(60, rel=0.05)
    assert 0.15 < flops.target.attention / flops.target.total < 0.25  # 1568 tokens: attention is a fifth
    table = flops.table()
    assert "| target encoder (fwd) | 22.85 | 5.801 | 28.65 | 46% |" in table and "| step | | | 61.86 |" in table


# torch's counter for the CPU flash kernels: the forward's 2 products, the backward's 5 (it recomputes the scores);
# the analytic count (the model's work) has 2 and 4, as the eager backward does.
FLASH = {"aten._scaled_dot_product_flash_attention_for_cpu",
         "aten._scaled_dot_product_flash_attention_for_cpu_backward"}
LINEAR = ("aten.mm", "aten.addmm", "aten.convolution", "aten.convolution_backward")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_analytic_count_matches_torch_flop_counter(backend):
    """Linear layers and attention each exactly as torch counts them, forward and backward."""
    cfg = tiny_config(f"model.attn_backend={backend}", "model.embed_dim=64", "model.num_heads=4",
                      "model.pred_embed_dim=32", "data.crop_size=64", "data.patch_size=16", "data.num_frames=8")
    torch.manual_seed(0)
    model = VJEPA(cfg)
    clips, enc, pred = tiny_batch(cfg)
    register_cpu_sdpa_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(clips, enc, pred, computation="fast").backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear = sum(counts.pop(op) for op in LINEAR)
    assert set(counts) == ({"aten.bmm"} if backend == "eager" else FLASH)  # what is left is attention
    attention = sum(counts.values())
    analytic = step_flops(cfg, [m.size(1) for m in enc], [m.size(1) for m in pred])
    nets = (analytic.target, analytic.context, analytic.predictor)
    assert linear == sum(f.linear for f in nets)
    trained = analytic.context.attention + analytic.predictor.attention  # forward + backward: 3 forwards
    expected = analytic.target.attention + trained * (1 if backend == "eager" else (2 + 5) / 6)
    assert attention == pytest.approx(expected, rel=1e-12)


def _sdpa_macs(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention (which fvcore does not count): the score and value
    products, q [B, H, L, hd] x k [B, H, S, hd], in multiply-adds as fvcore counts."""
    from fvcore.nn.jit_handles import get_shape

    *batch, length, head_dim = get_shape(inputs[0])
    keys = get_shape(inputs[1])[-2]
    return 2 * math.prod(batch) * length * keys * head_dim


def test_analytic_count_matches_fvcore_per_network():
    fvcore = pytest.importorskip("fvcore.nn", reason="fvcore (pip install vjepa_fast[fvcore]) is not installed")
    cfg = tiny_config("model.attn_backend=sdpa", "model.embed_dim=64", "model.num_heads=4", "model.pred_embed_dim=32",
                      "data.crop_size=64", "data.patch_size=16", "data.num_frames=8")
    torch.manual_seed(0)
    model = VJEPA(cfg).eval()
    clips, enc, pred = tiny_batch(cfg)
    analytic = step_flops(cfg, [m.size(1) for m in enc], [m.size(1) for m in pred])

    def counted(module, inputs) -> dict[str, float]:
        """FLOPs (2 per multiply-add; fvcore counts multiply-adds) by operator, attention through our handle."""
        analysis = fvcore.FlopCountAnalysis(module, inputs).set_op_handle(
            "aten::scaled_dot_product_attention", _sdpa_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return {op: 2.0 * n for op, n in analysis.by_operator().items()}  # norms too, which we do not count

    with torch.no_grad():
        target = counted(model.target_encoder, (clips,))
        assert target["linear"] + target["conv"] == pytest.approx(analytic.target.linear, rel=1e-9)
        assert target["scaled_dot_product_attention"] == pytest.approx(analytic.target.attention, rel=1e-9)
        # the reference computation embeds the clip once per mask; the analytic count (as the fast one) once
        context = counted(model.encoder, (clips, enc))
        embed = target["conv"]
        assert context["conv"] == pytest.approx(len(enc) * embed, rel=1e-9)
        assert context["linear"] == pytest.approx((analytic.context.linear - 2 * embed) / 3, rel=1e-9)
        assert context["scaled_dot_product_attention"] == pytest.approx(analytic.context.attention / 3, rel=1e-9)
        predictor = counted(model.predictor, (model.encoder(clips, enc), enc, pred))
        assert predictor["linear"] == pytest.approx(analytic.predictor.linear / 3, rel=1e-9)
        attention = predictor["scaled_dot_product_attention"]
        assert attention == pytest.approx(analytic.predictor.attention / 3, rel=1e-9)
