"""V-JEPA 2 against its official source: parameter counts of the official constructors, and the features and
predictions of official weights through our loaders and networks (RoPE included), on the CPU in fp32 (and the
features under bf16 autocast).

Runs only where VJEPA_FAST_OFFICIAL_DIR names a folder holding the official V-JEPA 2 source in vjepa2/ (.ci/run
sets it where one exists). The official code runs in a subprocess, with a stand-in for timm (only its drop_path,
at rate 0, is used) and einops installed."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vjepa_fast.checkpoint import load_encoder, networks_of, load_checkpoint
from vjepa_fast.config import load_config
from vjepa_fast.models.build import MODEL_SIZES, build_encoder, build_predictor

OFFICIAL = Path(os.environ.get("VJEPA_FAST_OFFICIAL_DIR", "/nonexistent")) / "vjepa2"
pytestmark = [
    pytest.mark.skipif(not OFFICIAL.is_dir(), reason="VJEPA_FAST_OFFICIAL_DIR does not name the official source"),
]

PRELUDE = textwrap.dedent(f"""\
    import sys, types, json, torch
    timm = types.ModuleType("timm"); models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    layers.drop_path = lambda x, drop_prob=0.0, training=False: x  # the only timm function the models use
    timm.models, models.layers = models, layers
    sys.modules.update({{"timm": timm, "timm.models": models, "timm.models.layers": layers}})
    sys.path.insert(0, {str(OFFICIAL)!r})
    import src.models.vision_transformer as vit
    import src.models.predictor as pred
    """)


def _official(code: str) -> str:
    pytest.importorskip("einops", reason="the official models import einops (pip install einops)")
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


V2_NAMES = ["vit_large", "vit_huge", "vit_giant_xformers", "vit_gigantic", "vit_gigantic_xformers"]


def test_parameter_counts_match_the_official_constructors():
    counts = json.loads(_official(f"""
        out = {{}}
        linspace = torch.linspace  # the constructors read their drop-path rates with .item(): on the CPU
        torch.linspace = lambda *args, **kwargs: linspace(*args, **{{**kwargs, "device": "cpu"}})
        with torch.device("meta"):  # counted without allocating (ViT-gigantic has 1.8B parameters)
            for name in {V2_NAMES!r}:
                m = vit.__dict__[name](img_size=256, num_frames=16, use_rope=True)
                out[name] = sum(p.numel() for p in m.parameters())
            for name in ("vit_large", "vit_huge", "vit_giant_xformers"):
                e = vit.__dict__[name](img_size=256, num_frames=16, use_rope=True)
                p = pred.vit_predictor(img_size=256, patch_size=16, num_frames=16, tubelet_size=2,
                                       embed_dim=e.embed_dim, predictor_embed_dim=384, depth=12, num_heads=12,
                                       use_mask_tokens=True, num_mask_tokens=6, use_rope=True)
                out["predictor " + name] = sum(x.numel() for x in p.parameters())
        print(json.dumps(out))
        """).strip().splitlines()[-1])
    for name in V2_NAMES:
        cfg = load_config("vjepa2_vitl16", [f"model.model_name={name}"])
        with torch.device("meta"):
            ours = sum(p.numel() for p in build_encoder(cfg).parameters())
        assert ours == counts[name], name
    assert counts["vit_giant_xformers"] == 1_012_173_952 and MODEL_SIZES["vit_giant_xformers"][2] == 22
    for config, name in (("vjepa2_vitl16", "vit_large"), ("vjepa2_vith16", "vit_huge"),
                         ("vjepa2_vitg16", "vit_giant_xformers")):
        with torch.device("meta"):
            ours = sum(p.numel() for p in build_predictor(load_config(config)).parameters())
        assert ours == counts["predictor " + name], config


def test_official_weights_give_the_official_features_and_predictions(tmp_path):
    """A small official RoPE encoder and predictor (random weights, the V-JEPA 2 checkpoint layout): our
    load_encoder's features, and our predictor on the same weights and masks, equal the official outputs."""
    _official(f"""
        torch.manual_seed(0)
        enc = vit.vit_tiny(img_size=64, num_frames=4, patch_size=16, tubelet_size=2, use_rope=True, use_sdpa=True)
        prd = pred.vit_predictor(img_size=64, patch_size=16, num_frames=4, tubelet_size=2, embed_dim=192,
                                 predictor_embed_dim=96, depth=2, num_heads=3, use_mask_tokens=True,
                                 num_mask_tokens=6, zero_init_mask_tokens=False, use_rope=True)
        with torch.no_grad():
            for p in list(enc.parameters()) + list(prd.parameters()):
                p.add_(0.05 * torch.randn_like(p))  # beyond the init: every weight matters
        clips = torch.randn(2, 3, 4, 64, 64)
        N = 2 * 4 * 4
        ctx = torch.stack([torch.randperm(N)[:13].sort().values for _ in range(2)])
        tgt = torch.stack([torch.tensor(sorted(set(range(N)) - set(c.tolist())))[:17] for c in ctx])
        with torch.no_grad():
            full = enc(clips)
            z = enc(clips, masks=[ctx])
            p = prd(z, ctx, tgt, mask_index=1)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as trained: RoPE's angles in bf16 too
                full_bf16 = enc(clips)
        state = {{"encoder": {{"module.backbone." + k: v for k, v in enc.state_dict().items()}},
                 "target_encoder": {{"module.backbone." + k: v for k, v in enc.state_dict().items()}},
                 "predictor": {{"module.backbone." + k: v for k, v in prd.state_dict().items()}},
                 "epoch": 1, "loss": 0.5}}
        torch.save(state, {str(tmp_path / "official.pt")!r})
        torch.save({{"clips": clips, "ctx": ctx, "tgt": tgt, "full": full, "z": z, "pred": p,
                    "full_bf16": full_bf16}},
                   {str(tmp_path / "outputs.pt")!r})
        """)
    out = torch.load(tmp_path / "outputs.pt")
    encoder = load_encoder(tmp_path / "official.pt", num_frames=4, img_size=64, num_heads=3)
    assert encoder.use_rope and encoder.pos_embed is None
    with torch.no_grad():
        torch.testing.assert_close(encoder(out["clips"]), out["full"], rtol=0, atol=1e-5)
        torch.testing.assert_close(encoder(out["clips"], out["ctx"]), out["z"], rtol=0, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(encoder(out["clips"]), out["full_bf16"])
    cfg = load_config("vjepa2_vitl16", ["model.model_name=vit_tiny", "data.crop_size=64", "data.dataset_fpcs=[4, 4, 4]",
                                        "model.pred_depth=2", "model.pred_embed_dim=96", "model.pred_num_heads=3"])
    predictor = build_predictor(cfg)
    predictor.load_state_dict(networks_of(load_checkpoint(tmp_path / "official.pt"), "official.pt")["predictor"])
    with torch.no_grad():
        mine = predictor([out["z"]], [out["ctx"]], [out["tgt"]], mask_token_ids=[1])[0]
    torch.testing.assert_close(mine, out["pred"], rtol=0, atol=1e-5)
