import math

import numpy as np
import pytest
import torch

from vjepa_fast.config import load_config
from vjepa_fast.models.build import build_encoder, build_predictor
from vjepa_fast.models import Attention, VisionTransformer, sincos_3d


def _trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_vitl16_parameter_counts():
    cfg = load_config("vitl16")
    with torch.device("meta"):
        encoder, predictor = build_encoder(cfg), build_predictor(cfg)
    assert round(_trainable(encoder) / 1e6, 1) == 303.9
    assert round(_trainable(predictor) / 1e6, 2) == 22.08
    assert not encoder.pos_embed.requires_grad and encoder.pos_embed.shape == (1, 1568, 1024)


@pytest.mark.parametrize("name, dim, depth, heads", [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6),
                                                     ("vit_base", 768, 12, 12), ("vit_huge", 1280, 32, 16),
                                                     ("vit_giant", 1408, 40, 16)])
def test_named_sizes(name, dim, depth, heads):
    cfg = load_config("vitl16", [f"model.model_name={name}"])
    with torch.device("meta"):
        enc = build_encoder(cfg)
    assert (enc.embed_dim, len(enc.blocks), enc.num_heads) == (dim, depth, heads)
    hidden = enc.blocks[0].mlp.fc1.out_features
    assert hidden == int(dim * (48 / 11 if name == "vit_giant" else 4))


def _official_pos_embed(dim, grid_depth, grid_size, uniform_power):
    """Independent transcription of the official numpy code (note its meshgrid argument order)."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=float) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gd, gh, gw = (np.arange(n, dtype=float) for n in (grid_depth, grid_size, grid_size))
    gh, gd, gw = np.meshgrid(gh, gd, gw)
    if uniform_power:
        hd = wd = dd = int(np.ceil(dim / 6) * 2)
    else:
        hd, wd, dd = dim // 4, dim // 4, dim // 2
    emb = np.concatenate([one_d(dd, gd), one_d(hd, gh), one_d(wd, gw)], axis=1)
    return emb[:, :dim]


@pytest.mark.parametrize("dim, uniform", [(1024, True), (384, True), (96, True), (1280, False), (192, False)])
def test_pos_embed_matches_official_formula(dim, uniform):
    ours = sincos_3d(dim, 8, 14, uniform_power=uniform)
    ref = torch.from_numpy(_official_pos_embed(dim, 8, 14, uniform)).float()
    assert ours.shape == (8 * 14 * 14, dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_pos_embed_spot_values():
    # D=1024: three parts of 342 columns; token (t=1, h=2, w=3) is row 1*196 + 2*14 + 3.
    emb = sincos_3d(1024, 8, 14)
    row = emb[1 * 196 + 2 * 14 + 3]
    assert row[0].item() == pytest.approx(math.sin(1.0))  # d part, omega_0 = 1
    assert row[171].item() == pytest.approx(math.cos(1.0))
    assert row[342].item() == pytest.approx(math.sin(2.0))  # h part
    assert row[684].item() == pytest.approx(math.sin(3.0))  # w part
    assert row[684 + 171 - 2].item() == pytest.approx(math.sin(3.0 / 10000 ** (169 / 171)), abs=1e-7)


def test_token_order_is_t_then_h_then_w():
    enc = VisionTransformer(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=24, depth=1,
                            num_heads=2)
    clip = torch.zeros(1, 3, 4, 32, 32)
    t, h, w = 1, 2, 3  # tubelet 1 covers frames 2-3; patch (2, 3) covers rows 16-23, columns 24-31
    clip[:, :, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8] = 1.0
    tokens = enc.patch_embed(clip)[0]
    bias = enc.patch_embed.proj.bias
    changed = [i for i in range(tokens.size(0)) if not torch.allclose(tokens[i], bias)]
    assert changed == [t * 16 + h * 4 + w]


def test_eager_and_sdpa_attention_agree():
    torch.manual_seed(0)
    attn = Attention(48, 3, backend="sdpa").double()
    x = torch.randn(2, 17, 48, dtype=torch.float64)
    out_sdpa = attn(x)
    attn.backend = "eager"
    torch.testing.assert_close(attn(x), out_sdpa)
    attn.backend = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        attn(x)


def test_masked_forward_runs_blocks_on_the_kept_tokens_only():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=24, depth=2,
                            num_heads=2).double()
    clip = torch.randn(2, 3, 4, 32, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 5, 9, 31], [1, 2, 3, 30]])
    tokens = enc.patch_embed(clip) + enc.pos_embed
    x = torch.stack([tokens[b, mask[b]] for b in range(2)])
    for blk in enc.blocks:
        x = blk(x)
    torch.testing.assert_close(enc(clip, mask), enc.norm(x))
    with pytest.raises(ValueError, match=r"expects clips \[B, 3, 4, 32, 32\]"):
        enc(torch.randn(1, 3, 8, 32, 32, dtype=torch.float64))


def test_init_follows_the_official_scheme():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=256, depth=4,
                            num_heads=4)
    std = enc.blocks[0].attn.qkv.weight.std().item()
    assert 0.018 < std < 0.022
    assert enc.blocks[0].attn.qkv.bias.abs().max() == 0
    ratio = enc.blocks[3].mlp.fc2.weight.std() / enc.blocks[0].mlp.fc2.weight.std()
    assert ratio.item() == pytest.approx(1 / math.sqrt(4), rel=0.05)  # fc2 of block l scaled by 1/sqrt(2l)
    assert torch.all(enc.norm.weight == 1)
