"""V-JEPA 2 against its official source: parameter counts of the official constructors, and the features and
predictions of official weights through our loaders and networks (RoPE included), on the CPU in fp32 (and the
features under bf16 autocast).

Runs only where VJEPA_FAST_OFFICIAL_DIR names a folder holding the official V-JEPA 2 source in vjepa2/ (.ci/run
sets it where one exists). The official code runs in a subprocess, with a stand-in for timm (only its drop_path,
at rate 0, is used) and einops installed."""
import csv
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


def test_official_rope_encoder_features_at_other_sizes(tmp_path):
    """An official RoPE encoder built for 64 px and 4 frames encodes larger, smaller, non-square and ragged clips
    (frames and pixels past the last whole tubelet and patch): load_encoder of its file, given no size, gives the
    official features for each, in both computations, masked or not."""
    sizes = [(2, 8, 96, 96), (2, 2, 32, 32), (1, 4, 48, 80), (1, 5, 70, 40)]  # (B, T, H, W)
    _official(f"""
        torch.manual_seed(0)
        enc = vit.vit_tiny(img_size=64, num_frames=4, patch_size=16, tubelet_size=2, use_rope=True, use_sdpa=True)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out = []
        for B, T, H, W in {sizes!r}:
            clips = torch.randn(B, 3, T, H, W)
            n = T // 2 * (H // 16) * (W // 16)
            mask = torch.stack([torch.randperm(n)[:n // 2] for _ in range(B)])
            with torch.no_grad():
                out.append({{"clips": clips, "mask": mask, "full": enc(clips), "masked": enc(clips, masks=[mask])}})
        torch.save({{"encoder": {{"module.backbone." + k: v for k, v in enc.state_dict().items()}},
                    "target_encoder": {{"module.backbone." + k: v for k, v in enc.state_dict().items()}}}},
                   {str(tmp_path / "official.pt")!r})
        torch.save(out, {str(tmp_path / "outputs.pt")!r})
        """)
    encoder = load_encoder(tmp_path / "official.pt", num_heads=3)
    assert (encoder.img_size, encoder.num_frames) == (256, 16)
    with torch.no_grad():
        for case in torch.load(tmp_path / "outputs.pt"):
            for computation in ("reference", "fast"):
                full = encoder(case["clips"], computation=computation)
                torch.testing.assert_close(full, case["full"], rtol=0, atol=1e-5)
                masked = encoder(case["clips"], case["mask"], computation=computation)
                torch.testing.assert_close(masked.reshape(case["masked"].shape), case["masked"], rtol=0, atol=1e-5)


# A training checkpoint as the official V-JEPA 2 trainer writes it: its init_video_model and init_opt for a tiny
# RoPE model (one clip length in three datasets: six mask tokens), DDP as app/vjepa/train.py wraps the networks
# (a one-process gloo group), one fp32 step of its train_step, saved as its save_checkpoint saves (epoch 1).
OFFICIAL_TRAINER = """
    import copy, os, socket
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from app.vjepa.utils import init_opt, init_video_model
    from src.masks.utils import apply_masks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    encoder, predictor = init_video_model(
        device=torch.device("cpu"), patch_size=16, max_num_frames=4, tubelet_size=2, model_name="vit_tiny",
        crop_size=64, pred_depth=2, pred_num_heads=3, pred_embed_dim=96, use_mask_tokens=True, num_mask_tokens=6,
        zero_init_mask_tokens=True, use_sdpa=True, use_rope=True, wide_silu=True)
    target_encoder = copy.deepcopy(encoder)
    optimizer, scaler, scheduler, wd_scheduler = init_opt(
        is_anneal=False, encoder=encoder, predictor=predictor, wd=0.04, final_wd=0.04, start_lr=1e-4, ref_lr=1e-3,
        final_lr=1e-3, iterations_per_epoch=3, warmup=1, num_epochs=2, ipe_scale=1.0, mixed_precision=False)
    encoder = DistributedDataParallel(encoder, static_graph=True)
    predictor = DistributedDataParallel(predictor, static_graph=False, find_unused_parameters=True)
    target_encoder = DistributedDataParallel(target_encoder)
    for p in target_encoder.parameters():
        p.requires_grad = False
    scheduler.step()
    wd_scheduler.step()
    clips = [torch.randn(2, 3, 4, 64, 64)]
    N = 2 * 4 * 4
    ctx = [torch.stack([torch.randperm(N)[:n].sort().values for _ in range(2)]) for n in (20, 8)]
    tgt = [torch.stack([torch.tensor(sorted(set(range(N)) - set(c.tolist()))) for c in m]) for m in ctx]
    masks_enc, masks_pred = [ctx], [tgt]
    with torch.no_grad():
        h = [F.layer_norm(hi, (hi.size(-1),)) for hi in target_encoder(clips)]
    z = predictor(encoder(clips, masks_enc), masks_enc, masks_pred)
    h = [apply_masks(hi, mi, concat=False) for hi, mi in zip(h, masks_pred)]
    terms = [torch.mean(torch.abs(zij - hij)) for zi, hi in zip(z, h) for zij, hij in zip(zi, hi)]
    loss = sum(terms) / len(terms)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save({"encoder": encoder.state_dict(), "predictor": predictor.state_dict(), "opt": optimizer.state_dict(),
                "scaler": None, "target_encoder": target_encoder.state_dict(), "epoch": 1, "loss": float(loss),
                "batch_size": 2, "world_size": 1, "lr": 1e-3}, PATH)
    dist.destroy_process_group()
    """


@pytest.fixture(scope="module")
def official_training_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "latest.pt"
    _official(OFFICIAL_TRAINER.replace("PATH", repr(str(path))))
    return path


def _tiny_like_the_official(dataset, *extra):
    csv = dataset.motion_train_csv
    return load_config("vjepa2_vitl16", [
        "model.model_name=vit_tiny", "data.crop_size=64", "data.num_frames=4", "data.dataset_fpcs=[4, 4, 4]",
        f"data.datasets=[{csv}, {csv}, {csv}]", "data.fps=8", "data.batch_size=2", "data.num_workers=0",
        "model.pred_depth=2", "model.pred_embed_dim=96", "model.pred_num_heads=3",
        "model.use_activation_checkpointing=false", "optimization.ipe=3", "optimization.epochs=2",
        "optimization.warmup=1", "optimization.start_lr=1e-4", "optimization.lr=1e-3", "optimization.final_lr=1e-3",
        "optimization.weight_decay=0.04", "optimization.final_weight_decay=0.04", "logging.log_every=1", *extra])


def test_a_cooldown_starts_from_an_official_training_checkpoint(official_training_checkpoint, tiny_dataset,
                                                                tmp_path):
    from vjepa_fast.train import train
    raw = torch.load(official_training_checkpoint, weights_only=True)
    assert [g["fused"] for g in raw["opt"]["param_groups"]] == [None] * 4  # what broke our fused AdamW's step
    cfg = _tiny_like_the_official(tiny_dataset, "optimization.is_anneal=true",
                                  f"optimization.anneal_ckpt={official_training_checkpoint}",
                                  "optimization.final_lr=0.0", "optimization.warmup=0")
    assert train(cfg, tmp_path / "cooldown", max_steps=2, progress=False).end_step == 2
    state = load_checkpoint(tmp_path / "cooldown" / "checkpoints" / "latest.pt")
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {1 + 2}  # its AdamW step carried on
    assert len(state["optimizer"]["state"]) == len(raw["opt"]["state"])  # tokens 1-5: no state, as it left them


def test_read_checkpoint_resumes_an_official_training_checkpoint(official_training_checkpoint, tiny_dataset,
                                                                 tmp_path):
    from vjepa_fast.optim import Schedule
    from vjepa_fast.train import train
    cfg = _tiny_like_the_official(tiny_dataset, "meta.load_checkpoint=true",
                                  f"meta.read_checkpoint={official_training_checkpoint}")
    result = train(cfg, tmp_path / "resumed", max_steps=5, progress=False)
    assert (result.start_step, result.end_step) == (3, 5)  # epoch 1 x ipe 3: where the official trainer goes on
    schedule = Schedule.from_config(cfg.optimization)
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 4]
    assert [float(r["lr"]) for r in rows] == pytest.approx([schedule.lr(4), schedule.lr(5)])  # warmup done
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {1 + 2}
