import math

import pytest
import torch
import torch.nn.functional as F

from vjepa_fast.eval.probe import AttentiveProbe, LinearProbe, build_probe
from vjepa_fast.models import VisionTransformer


def _encoder():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=32, depth=1,
                             num_heads=4).eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["attentive", "linear"])
def test_probe_shapes_and_gradients_reach_only_the_probe(name):
    encoder = _encoder()
    probe = build_probe(name, 32, encoder.num_heads, num_classes=5)
    clips = torch.randn(6, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    logits = probe(encoder(clips))
    assert logits.shape == (6, 5)
    F.cross_entropy(logits, torch.arange(6) % 5).backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in probe.parameters())


def test_attentive_probe_is_the_official_cross_attention_block():
    torch.manual_seed(0)
    probe = AttentiveProbe(dim=8, num_heads=2, num_classes=3)
    tokens = torch.randn(2, 5, 8)
    # by hand: one query, keys/values from layer-normed tokens, per-head softmax(q.k / sqrt(d_head)) v
    x = F.layer_norm(tokens, (8,), probe.norm1.weight, probe.norm1.bias, eps=1e-5)
    q = probe.xattn.q(probe.query).reshape(1, 2, 4)  # [query, heads, head_dim]
    k, v = probe.xattn.kv(x).reshape(2, 5, 2, 2, 4).unbind(2)  # [B, N, heads, head_dim]
    weights = torch.einsum("qhd,bnhd->bhn", q, k).div(math.sqrt(4)).softmax(-1)
    pooled = probe.query[0] + probe.xattn.proj(torch.einsum("bhn,bnhd->bhd", weights, v).reshape(2, 8))
    pooled = pooled + probe.mlp(F.layer_norm(pooled, (8,), probe.norm2.weight, probe.norm2.bias, eps=1e-5))
    torch.testing.assert_close(probe(tokens), probe.head(pooled))
    # attention pooling ignores token order
    torch.testing.assert_close(probe(tokens[:, torch.randperm(5)]), probe(tokens))


def test_official_init_scales_the_output_projections():
    torch.manual_seed(0)
    probe = AttentiveProbe(dim=256, num_heads=4, num_classes=3)
    assert probe.query.std().item() == pytest.approx(0.02, rel=0.2)
    assert probe.xattn.q.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert probe.xattn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert probe.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert probe.mlp.fc1.out_features == 4 * 256


def test_linear_probe_classifies_the_standardised_mean_token():
    torch.manual_seed(0)
    probe = LinearProbe(dim=4, num_classes=2).eval()
    tokens = torch.randn(3, 6, 4)
    expected = probe.head(F.batch_norm(tokens.mean(1), probe.norm.running_mean, probe.norm.running_var,
                                       training=False, eps=probe.norm.eps))
    torch.testing.assert_close(probe(tokens), expected)
    assert [n for n, _ in probe.named_parameters()] == ["head.weight", "head.bias"]


def test_unknown_probe_is_named():
    with pytest.raises(ValueError, match="'mlp'"):
        build_probe("mlp", 8, 2, 3)
