import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


class _OfficialMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _OfficialAttention(nn.Module):  # src/models/utils/modules.py Attention (use_sdpa)
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _OfficialBlock(nn.Module):  # Block with norm_layer=nn.LayerNorm (the pooler's)
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _OfficialAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), _OfficialMLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _OfficialCrossAttention(nn.Module):  # V-JEPA 1: proj defined, never applied
    def __init__(self, dim, num_heads, with_proj):
        super().__init__()
        self.num_heads, self.q, self.kv = num_heads, nn.Linear(dim, dim), nn.Linear(dim, dim * 2)
        if with_proj:
            self.proj = nn.Linear(dim, dim)

    def forward(self, q, x):
        B, n, C = q.shape
        q = self.q(q).reshape(B, n, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        B, N, C = x.shape
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return q.transpose(1, 2).reshape(B, n, C)


class _OfficialCrossAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, with_proj):
        super().__init__()
        self.norm1, self.xattn = nn.LayerNorm(dim), _OfficialCrossAttention(dim, num_heads, with_proj)
        self.norm2, self.mlp = nn.LayerNorm(dim), _OfficialMLP(dim, 4 * dim)

    def forward(self, q, x):
        q = q + self.xattn(q, self.norm1(x))
        return q + self.mlp(self.norm2(q))


class _OfficialPooler(nn.Module):
    """jepa (V-JEPA 1, depth 1) and vjepa2 (blocks over the tokens first) src/models/attentive_pooler.py."""

    def __init__(self, dim, num_heads, depth, v2):
        super().__init__()
        self.v2 = v2
        self.query_tokens = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.cross_attention_block = _OfficialCrossAttentionBlock(dim, num_heads, with_proj=not v2)
        self.blocks = nn.ModuleList([_OfficialBlock(dim, num_heads) for _ in range(depth - 1)]) if depth > 1 else None

    def forward(self, x):
        if self.v2 and self.blocks is not None:
            for blk in self.blocks:
                x = blk(x)
        q = self.cross_attention_block(self.query_tokens.repeat(len(x), 1, 1), x)
        if not self.v2 and self.blocks is not None:
            for blk in self.blocks:
                q = blk(q)
        return q


class _OfficialAttentiveClassifier(nn.Module):
    def __init__(self, dim, num_heads, num_classes, depth=1, v2=False):
        super().__init__()
        self.pooler = _OfficialPooler(dim, num_heads, depth, v2)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(self.pooler(x).squeeze(1))


def _ours_from_official(state):
    """Official AttentiveClassifier keys -> ours (V-JEPA 1's never-applied xattn.proj has no counterpart)."""
    renames = {"pooler.query_tokens": "query", "pooler.cross_attention_block.": "", "pooler.blocks.": "blocks.",
               "linear.": "head."}
    out = {}
    for key, value in state.items():
        if ".xattn.proj." in key:
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


@pytest.mark.parametrize("depth,v2", [(1, False), (1, True), (4, True)])
def test_official_classifier_weights_give_the_official_logits(depth, v2):
    torch.manual_seed(0)
    official = _OfficialAttentiveClassifier(16, 4, 5, depth=depth, v2=v2)
    for p in official.parameters():  # non-trivial values everywhere (biases and norms too)
        p.data.normal_(0, 0.3)
    ours = AttentiveProbe(16, 4, 5, depth=depth)
    ours.load_state_dict(_ours_from_official(official.state_dict()))
    tokens = torch.randn(3, 7, 16)
    torch.testing.assert_close(ours(tokens), official(tokens))
    torch.testing.assert_close(ours(tokens[:, torch.randperm(7)]), ours(tokens))  # pooling ignores token order


OFFICIAL = Path(os.environ.get("VJEPA_FAST_OFFICIAL_DIR", "/nonexistent"))
# The official pooler's modules import timm's drop_path (V-JEPA 2), used at rate 0: a stand-in, as
# test_vjepa2_official.py
OFFICIAL_CLASSIFIER = """
import sys, types, torch
timm = types.ModuleType("timm"); models = types.ModuleType("timm.models")
layers = types.ModuleType("timm.models.layers")
layers.drop_path = lambda x, drop_prob=0.0, training=False: x
timm.models, models.layers = models, layers
sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
sys.path.insert(0, REPO)
from src.models.attentive_pooler import AttentiveClassifier
torch.manual_seed(0)
classifier = AttentiveClassifier(embed_dim=16, num_heads=4, depth=DEPTH, num_classes=5).eval()
for p in classifier.parameters():  # non-trivial values everywhere (biases and norms too)
    p.data.normal_(0, 0.3)
tokens = torch.load(OUT)["tokens"]
with torch.no_grad():
    torch.save({"tokens": tokens, "state": classifier.state_dict(), "logits": classifier(tokens)}, OUT)
"""


@pytest.mark.skipif(not (OFFICIAL / "vjepa2").is_dir(), reason="VJEPA_FAST_OFFICIAL_DIR does not name the official "
                    "code")
@pytest.mark.parametrize("repo,depth", [("jepa", 1), ("vjepa2", 1), ("vjepa2", 4)])
def test_the_official_classifier_source_gives_our_logits(tmp_path, repo, depth):
    """The official AttentiveClassifier itself (V-JEPA 1; V-JEPA 2 at its 4 blocks), run from its source."""
    out = tmp_path / "classifier.pt"
    torch.save({"tokens": torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))}, out)
    code = textwrap.dedent(OFFICIAL_CLASSIFIER).replace("REPO", repr(str(OFFICIAL / repo))).replace(
        "DEPTH", str(depth)).replace("OUT", repr(str(out)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    official = torch.load(out)
    assert any(".xattn.proj." in key for key in official["state"]) == (repo == "jepa")  # defined, never applied
    ours = AttentiveProbe(16, 4, 5, depth=depth).eval()
    ours.load_state_dict(_ours_from_official(official["state"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(official["tokens"]), official["logits"], rtol=1e-5, atol=1e-5)


def test_official_init_scales_the_output_projections():
    torch.manual_seed(0)
    probe = AttentiveProbe(dim=256, num_heads=4, num_classes=3)
    assert probe.query.std().item() == pytest.approx(0.02, rel=0.2)
    assert probe.xattn.q.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert probe.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert probe.mlp.fc1.out_features == 4 * 256
    deep = AttentiveProbe(dim=256, num_heads=4, num_classes=3, depth=4)  # vjepa2 AttentivePooler._rescale_blocks
    for layer_id, block in enumerate(deep.blocks, start=1):
        assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.1)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.1)
        assert block.norm1.eps == 1e-5
    assert deep.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.1)


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
