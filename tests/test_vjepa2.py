"""V-JEPA 2 recipes: the official configs load and are honoured key by key, 3D RoPE models, clips of several
lengths packed into one pass, fps sampling, the warmup-constant schedule and the cooldown (with exact resume)."""
import csv
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import TINY, metric_rows, run_training, start_training, tiny_config, wait_for
from vjepa_fast.checkpoint import load_checkpoint, load_encoder, save_checkpoint
from vjepa_fast.config import CONFIG_DIR, ConfigError, load_config
from vjepa_fast.dali_pipelines import ClipSpec, make_loader
from vjepa_fast.dali_pipelines.choose import dali_installed
from vjepa_fast.dali_pipelines.sampling import frame_indices
from vjepa_fast.masks import MaskGenerator
from vjepa_fast.model import VJEPA
from vjepa_fast.optim import Schedule
from vjepa_fast.train import train

V2_CONFIGS = ["vjepa2_vitl16", "vjepa2_vith16", "vjepa2_vitg16", "vjepa2_vitl16_cooldown_256px_64f",
              "vjepa2_vith16_cooldown_256px_64f", "vjepa2_vitg16_cooldown_256px_64f",
              "vjepa2_vitg16_cooldown_384px_64f"]
OFFICIAL = Path(os.environ.get("VJEPA_FAST_OFFICIAL_DIR", "/nonexistent")) / "vjepa2" / "configs" / "train"


def _quiet_load(name, overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report of the cluster keys
        return load_config(name, overrides)


# ---- configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", V2_CONFIGS)
def test_official_configs_are_honoured(name):
    cfg = _quiet_load(name)
    cooldown = "cooldown" in name
    assert cfg.model.use_rope and cfg.model.activation_checkpointing and cfg.model.pred_num_heads == 12
    assert cfg.data.fps == 4 and cfg.data.num_frames == max(cfg.data.dataset_fpcs) == (64 if cooldown else 16)
    assert cfg.data.crop_size == (384 if "384px" in name else 256)
    assert cfg.optimization.clip_grad is None  # V-JEPA 2 does not clip: its configs say nothing, its code does not
    assert cfg.optimization.ema == (0.99925, 0.99925) and cfg.optimization.is_anneal == cooldown
    assert cfg.meta.load_checkpoint and cfg.logging.keep_every == 50 * cfg.optimization.ipe  # save_every_freq
    model = cfg.model.model_name
    assert cfg.encoder_size[2] == (22 if model == "vit_giant_xformers" else 16)
    with torch.device("meta"):
        vjepa = VJEPA(cfg)
    assert vjepa.encoder.pos_embed is None and len(vjepa.predictor.mask_tokens) == 2 * 3


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="VJEPA_FAST_OFFICIAL_DIR does not name the official source")
def test_the_official_files_load_unchanged_and_equal_the_shipped_ones():
    files = sorted(OFFICIAL.glob("*/*.yaml"))
    official = {f"vjepa2_{p.parent.name}" + ("" if p.stem.startswith("pretrain") else "_" + p.stem.replace("-", "_")):
                p for p in files if "droid" not in p.stem}
    assert sorted(official) == sorted(V2_CONFIGS)
    for name, path in official.items():
        theirs, ours = _quiet_load(path), _quiet_load(name)
        assert theirs.logging.folder.startswith("/your_folder") and ours.logging.folder is None
        assert theirs.to_dict() | {"name": None, "logging": None} == ours.to_dict() | {"name": None, "logging": None}


def _v2_tree():
    return yaml.safe_load((CONFIG_DIR / "vjepa2_vitl16.yaml").read_text())


@pytest.mark.parametrize("section,key,value,match", [
    ("data", "clip_duration", 8.0, "data.fps=4 and data.clip_duration=8.0: give one"),
    ("model", "use_silu", True, "model.use_silu=True: not supported"),
    ("meta", "skip_batches", 10, "meta.skip_batches=10: not supported"),
    ("model", "use_rope", False, None),  # allowed: then one clip length only (sin-cos)
])
def test_keys_that_would_change_the_model_or_data_are_refused(tmp_path, section, key, value, match):
    tree = _v2_tree()
    tree[section][key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    if match is None:
        assert not _quiet_load(path).model.use_rope
        return
    with pytest.raises(ConfigError, match=match):
        _quiet_load(path)


def test_refusals_and_aliases(tmp_path):
    with pytest.raises(ConfigError, match="mask\\[0\\].full_complement=True: not supported"):
        _quiet_load("vjepa2_vitl16", ["mask.0.full_complement=true"])
    with pytest.raises(ConfigError, match="several lengths need model.use_rope=true"):
        tiny_config("data.dataset_fpcs=[4, 2]", "data.datasets=[a.csv, b.csv]")
    with pytest.raises(ConfigError, match="app='vjepa_droid'"):
        _quiet_load("vjepa2_vitl16", ["app=vjepa_droid"])
    with pytest.raises(ConfigError, match="data.fps=4 and data.sampling_rate=4: give one"):
        _quiet_load("vjepa2_vitl16", ["data.sampling_rate=4"])
    assert tiny_config("meta.use_sdpa=false").model.attn_backend == "eager"
    tree = _v2_tree() | {"folder": str(tmp_path / "from_the_config")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    assert _quiet_load(tmp_path / "cfg.yaml").logging.folder == str(tmp_path / "from_the_config")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config("vjepa2_vitl16")
    assert [str(w.message) for w in caught] == ["config keys not used here: nodes=16 (the launcher's (torchrun / "
                                                "srun set the processes)); tasks_per_node=8 (the launcher's); "
                                                "cpus_per_task=16 (the launcher's); mem_per_gpu='220G' (the "
                                                "launcher's)"]


def test_folder_is_the_default_run_directory(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(f"data.datasets=[{tiny_dataset.motion_train_csv}]", f"logging.folder={tmp_path / 'here'}")
    result = train(cfg, max_steps=1, progress=False)
    assert result.run_dir == tmp_path / "here" and (tmp_path / "here" / "checkpoints" / "latest.pt").exists()


# ---- schedules ----------------------------------------------------------------------------------

def test_warmup_then_constant_and_the_cooldown_decay():
    pretrain = Schedule.from_config(_quiet_load("vjepa2_vitg16").optimization)
    assert pretrain.lr(1) == pytest.approx(1e-4 + (5.25e-4 - 1e-4) / 12_000)
    assert pretrain.lr(12_000) == pretrain.lr(100_000) == pytest.approx(5.25e-4)  # constant after the warmup
    assert pretrain.wd(1) == pretrain.wd(200_000) == pytest.approx(0.04) and pretrain.momentum(5) == 0.99925
    short = Schedule.from_config(_quiet_load("vjepa2_vitl16").optimization)  # 3000 steps inside a 12000-step warmup
    assert short.lr(3000) == pytest.approx(1e-4 + 3000 / 12_000 * (5.25e-4 - 1e-4))
    cooldown = Schedule.from_config(_quiet_load("vjepa2_vitl16_cooldown_256px_64f").optimization)
    total = int(1.25 * 40 * 300)
    for s in (1, 6000, 12_000):
        assert cooldown.lr(s) == pytest.approx(5.25e-4 + s / total * (1e-6 - 5.25e-4))
    assert cooldown.lr(12_000) == pytest.approx(0.2 * 5.25e-4 + 0.8 * 1e-6)  # where the official cooldown ends


# ---- data ---------------------------------------------------------------------------------------

def test_fps_sampling_takes_the_official_frame_step():
    spec = ClipSpec(num_frames=16, fps=4)
    assert [spec.frame_step(fps) for fps in (30, 29.97, 25, 24, 60, 3.5)] == [7, 7, 6, 6, 15, 1]
    assert spec.frame_step(2) == 0  # slower than 4 fps: such a video is skipped as unsupported
    np.testing.assert_array_equal(frame_indices(300, 16, spec.frame_step(30), None),
                                  frame_indices(300, 16, 7, None))


def _mixed_dataset_files(dataset):
    return [dataset.motion_train_csv, dataset.appearance_train_csv]


def test_clips_of_several_lengths_come_grouped_by_length(tiny_dataset):
    files = _mixed_dataset_files(tiny_dataset)
    spec = ClipSpec(num_frames=4, sampling_rate=2, crop_size=16, source_frames=(2, 4))
    loader = make_loader(files, spec, batch_size=6, seed=3, num_workers=0, loader="pyav")
    batches = [next(loader) for _ in range(3)]
    for clips, labels in batches:
        assert isinstance(clips, list) and [c.shape[2] for c in clips] in ([2, 4], [2], [4])
        assert sum(c.shape[0] for c in clips) == 6 and [len(x) for x in labels] == [c.shape[0] for c in clips]
    resumed = make_loader(files, spec, batch_size=6, seed=3, start_step=2, num_workers=0, loader="pyav")
    clips, _ = next(resumed)
    assert all(torch.equal(a, b) for a, b in zip(clips, batches[2][0]))
    if dali_installed():
        with pytest.raises(ValueError, match="DALI loader stacks one clip length"):
            make_loader(files, spec, batch_size=6, seed=3, num_workers=0, loader="dali")


def _parity(model, clips, enc, pred):
    out = {}
    for computation in ("reference", "fast"):
        model.zero_grad(set_to_none=True)
        loss = model.loss(clips, enc, pred, computation=computation)
        loss.backward()
        out[computation] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_g), (fast, fast_g) = out["reference"], out["fast"]
    assert abs(fast - ref) <= 1e-5 * abs(ref) and set(ref_g) == set(fast_g)
    for name, g in ref_g.items():
        assert (fast_g[name] - g).abs().max() <= 1e-4 * g.abs().max().clamp_min(1e-12), name
    return ref_g


def _model(cfg):
    torch.manual_seed(0)
    model = VJEPA(cfg)
    with torch.no_grad():  # beyond a fresh init's symmetries: distinct mask tokens and target weights
        for tok in model.predictor.mask_tokens:
            tok.normal_()
        for p in model.target_encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("rope", [False, True])
def test_rope_and_sincos_models_fast_equals_reference(rope):
    from helpers import tiny_batch

    cfg = tiny_config(f"model.use_rope={str(rope).lower()}", "model.embed_dim=48", "model.num_heads=2",
                      "model.pred_embed_dim=24", "model.pred_num_heads=2")
    model = _model(cfg)
    assert (model.encoder.pos_embed is None) == rope and (model.predictor.predictor_pos_embed is None) == rope
    _parity(model, *tiny_batch(cfg))


def test_a_mixed_length_batch_in_one_pass_equals_the_official_passes():
    cfg = tiny_config("model.use_rope=true", "model.embed_dim=48", "model.num_heads=2", "model.pred_embed_dim=24",
                      "model.pred_num_heads=2", "data.num_frames=8", "data.dataset_fpcs=[8, 4]",
                      "data.datasets=[a.csv, b.csv]")
    model = _model(cfg)
    g = torch.Generator().manual_seed(0)
    clips, enc, pred = [], [], []
    for frames, batch in ((8, 3), (4, 2)):
        clips.append(torch.randn(batch, 3, frames, 32, 32, generator=g))
        masks = MaskGenerator(cfg.mask, 32, frames, 8, 2).gen(batch, 0, generator=g)
        enc.append(masks[0])
        pred.append(masks[1])
    grads = _parity(model, clips, enc, pred)
    # V-JEPA 2's mask tokens: 2 mask configs x 2 clip lengths; group g's masks share token g
    assert len(model.predictor.mask_tokens) == 4
    assert {n for n in grads if "mask_tokens" in n} == {"predictor.mask_tokens.0", "predictor.mask_tokens.1"}


def _v2_overrides(dataset, *extra):
    """A tiny V-JEPA 2 model (RoPE, fps sampling, clips of 2 and 4 frames) on the tiny dataset: overrides of TINY."""
    return ["model.use_rope=true", "model.embed_dim=48", "model.num_heads=2", "model.pred_embed_dim=24",
            "model.pred_num_heads=2", "data.fps=8", "data.sampling_rate=null",
            f"data.datasets=[{', '.join(_mixed_dataset_files(dataset))}]",
            "data.dataset_fpcs=[2, 4]", "data.batch_size=4", "optimization.clip_grad=null",
            "optimization.ema=[0.99, 0.99]", "optimization.final_lr=0.001", "optimization.lr=0.001",
            "logging.log_every=1", "logging.checkpoint_every=2", *extra]


def _v2_tiny(dataset, *extra):
    return tiny_config(*_v2_overrides(dataset, *extra))


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]


def test_mixed_length_training_resumes_exactly(tiny_dataset, tmp_path):
    cfg = _v2_tiny(tiny_dataset)
    train(cfg, tmp_path / "straight", max_steps=4, progress=False)
    train(cfg, tmp_path / "split", max_steps=2, progress=False)
    train(cfg, tmp_path / "split", max_steps=4, resume=True, progress=False)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    state = load_checkpoint(tmp_path / "straight" / "checkpoints" / "latest.pt")
    assert "pos_embed" not in state["encoder"] and "predictor_pos_embed" not in state["predictor"]
    encoder = load_encoder(tmp_path / "straight" / "checkpoints" / "latest.pt")
    assert encoder.use_rope and encoder(torch.randn(1, 3, 4, 32, 32)).shape == (1, 32, 48)


def test_the_health_monitor_measures_a_clip_length_group_of_one_clip(tiny_dataset, tmp_path):
    """Batches of 2 over 2 clip lengths: a step's first group often holds a single clip, which has a token spread
    but no clip spread."""
    cfg = _v2_tiny(tiny_dataset, "data.batch_size=2", "logging.health_every=1")
    train(cfg, tmp_path, max_steps=4, progress=False)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(float(r["health_token_spread"]) > 0 for r in rows)


def test_a_cooldown_starts_from_the_pretraining_checkpoint_and_survives_a_kill_exactly(tiny_dataset, tmp_path):
    train(_v2_tiny(tiny_dataset, "meta.seed=7"), tmp_path / "pretrain", max_steps=2, progress=False)
    anneal = str(tmp_path / "pretrain" / "checkpoints" / "latest.pt")
    # the cooldown: longer clips and a larger crop (RoPE needs no table for the new grid), the lr decaying
    cooldown = [*TINY, *_v2_overrides(tiny_dataset, "data.dataset_fpcs=[4, 4]", "data.num_frames=4",
                                      "data.crop_size=48", "optimization.is_anneal=true",
                                      f"optimization.anneal_ckpt={anneal}", "optimization.resume_anneal=true",
                                      "meta.load_checkpoint=true", "optimization.final_lr=0.0",
                                      "optimization.warmup=0", "optimization.epochs=1", "optimization.ipe=10",
                                      "optimization.ipe_scale=1.0")]
    assert f"cooldown: starting from {anneal} (networks and optimizer state)" in run_training(
        tmp_path / "straight", 8, cooldown)
    proc = start_training(tmp_path / "killed", 8, cooldown)
    latest = tmp_path / "killed" / "checkpoints" / "latest.pt"
    wait_for(lambda: latest.exists() and len(metric_rows(tmp_path / "killed")) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= load_checkpoint(latest)["step"] < 8
    run_training(tmp_path / "killed", 8, cooldown)  # the same command: resume_anneal continues the cooldown
    straight = _losses(tmp_path / "straight")
    assert _losses(tmp_path / "killed") == straight
    assert [lr for _, _, lr in straight] == pytest.approx([1e-3 * (1 - s / 10) for s in range(1, 9)])
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "latest.pt") for run in ("straight", "killed"))
    for net in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(value, b[net][key]) for key, value in a[net].items()), net
    cfg = tiny_config(*cooldown[len(TINY):], "optimization.resume_anneal=false")
    with pytest.raises(FileExistsError, match="--resume"):  # without resume_anneal only --resume continues
        train(cfg, tmp_path / "killed", max_steps=8, progress=False)
    train(cfg, tmp_path / "killed", max_steps=8, resume=True, progress=False)
    assert _losses(tmp_path / "killed") == straight
    cfg.optimization.resume_anneal = True  # overwrite wins over the config's resume: the cooldown starts again
    train(cfg, tmp_path / "killed", max_steps=2, overwrite=True, progress=False)
    restarted = _losses(tmp_path / "killed")  # in this process the kernels may run in the interpreter: ~1e-7
    assert [(s, lr) for s, _, lr in restarted] == [(s, lr) for s, _, lr in straight[:2]]
    assert [loss for _, loss, _ in restarted] == pytest.approx([loss for _, loss, _ in straight[:2]], rel=1e-5)
    with pytest.raises(ValueError, match="exclude each other"):
        train(cfg, tmp_path / "killed", max_steps=2, overwrite=True, resume=True, progress=False)
    # it started from the pretraining weights (another seed than the cooldown's own init) and optimizer state
    pretrained, fresh = load_checkpoint(anneal), VJEPA(cfg).state_dict()
    for name, value in ((n, v) for n, v in pretrained["encoder"].items() if v.dim() > 1):  # random-init weights
        moved, away = (a["encoder"][name] - value).abs().max(), (fresh[f"encoder.{name}"] - value).abs().max()
        assert moved < away / 2, name
    adam_steps = {int(s["step"]) for s in a["optimizer"]["state"].values()}
    assert adam_steps == {2 + 8, 2}  # 2 pretraining steps carried on, then 8 of the cooldown (2: the mask token of
    # the 2-frame group, which the cooldown's clips, all of 4 frames, never use)

    partial = tmp_path / "encoder_only.pt"
    save_checkpoint({"encoder": {f"module.backbone.{k}": v for k, v in pretrained["encoder"].items()}}, partial)
    with pytest.raises(ValueError, match="no predictor, target_encoder in it"):
        train(tiny_config(*cooldown[len(TINY):], f"optimization.anneal_ckpt={partial}"), tmp_path / "partial",
              max_steps=1, progress=False)


# ---- released checkpoints -------------------------------------------------------------------------

def test_a_released_vjepa2_file_loads_as_rope_and_vjepa_fast_eval_probes_it(tiny_dataset, tmp_path, capsys):
    """The released V-JEPA 2 files: `module.backbone.` keys, an unused sin-cos table, ten predictor mask tokens."""
    torch.manual_seed(0)
    cfg = _v2_tiny(tiny_dataset, "data.dataset_fpcs=[4]", "data.datasets=[" + tiny_dataset.motion_train_csv + "]")
    model = VJEPA(cfg)
    dead_table = torch.randn(1, 2 * 4 * 4, 48)
    released = {k: {f"module.backbone.{n}": t for n, t in getattr(model, k).state_dict().items()}
                for k in ("encoder", "target_encoder")}
    for k in ("encoder", "target_encoder"):
        released[k]["module.backbone.pos_embed"] = dead_table
    predictor = {f"module.backbone.{n}": t for n, t in model.predictor.state_dict().items()
                 if not n.startswith("mask_tokens.")}
    predictor.update({f"module.backbone.mask_tokens.{i}": torch.zeros(1, 1, 24) for i in range(10)})
    path = tmp_path / "vitl.pt"
    save_checkpoint({**released, "predictor": predictor, "epoch": 1}, path)

    clip = torch.randn(2, 3, 4, 32, 32)
    encoder = load_encoder(path, num_frames=4, num_heads=2, img_size=32)
    assert encoder.use_rope and "pos_embed" not in dict(encoder.named_parameters())
    with torch.no_grad():
        assert torch.equal(encoder(clip), model.target_encoder.eval()(clip))
        sincos = load_encoder(path, num_frames=4, num_heads=2, use_rope=False)  # the override reads the table
        assert not sincos.use_rope and not torch.allclose(sincos(clip), encoder(clip), atol=1e-3)

    from vjepa_fast import cli
    assert cli.main(["eval", "--checkpoint", str(path), "--num-frames", "4", "--num-heads", "2", "--img-size", "32",
                     "--train", tiny_dataset.motion_train_csv, "--val", tiny_dataset.motion_val_csv,
                     "--epochs", "2", "--batch-size", "4", "--out-dir", str(tmp_path / "eval"),
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0",
                     "--no-progress"]) == 0
    assert "attentive" in capsys.readouterr().out
    with open(tmp_path / "eval" / "attentive.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


# ---- clips of any size ------------------------------------------------------------------------------

def test_a_rope_encoder_takes_clips_of_any_size_as_one_built_for_that_size(tmp_path):
    """As the official RoPE encoder: built for one size, it encodes clips of other sizes and lengths (in both
    computations, masked or not, several sizes in one fast pass) exactly as an encoder built for that size with the
    same weights; frames and pixels past the last whole tubelet and patch are dropped. Sin-cos encoders keep
    their table's size."""
    from vjepa_fast.models.vit import VisionTransformer

    torch.manual_seed(0)
    shape = dict(patch_size=8, tubelet_size=2, embed_dim=48, depth=2, num_heads=2)
    built = VisionTransformer(img_size=32, num_frames=4, use_rope=True, **shape).eval()
    clips, fresh_out = [], []
    with torch.no_grad():
        for frames, size in ((8, 48), (2, 16)):  # larger and longer; smaller and shorter
            fresh = VisionTransformer(img_size=size, num_frames=frames, use_rope=True, **shape).eval()
            fresh.load_state_dict(built.state_dict())
            x = torch.randn(2, 3, frames, size, size)
            n = frames // 2 * (size // 8) ** 2
            mask = torch.stack([torch.randperm(n)[:n // 2] for _ in range(2)])
            for computation in ("reference", "fast"):
                for m in (None, mask):
                    assert torch.equal(built(x, m, computation=computation), fresh(x, m, computation=computation))
            clips.append(x)
            fresh_out.append(fresh(x))
            ragged = torch.cat([x, torch.randn(2, 3, 1, size, size)], 2)  # one frame past the last tubelet
            ragged = torch.nn.functional.pad(ragged, (0, 5, 0, 3))  # and pixels past the last patch
            assert torch.equal(built(ragged), fresh(x))
        for got, want in zip(built(clips, computation="fast"), fresh_out):  # one pass, each on its own grid
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # an official-format file, loaded without img_size / num_frames (nominal 256 px, 16 frames)
        save_checkpoint({k: {f"module.backbone.{n}": t for n, t in built.state_dict().items()}
                         for k in ("encoder", "target_encoder")}, tmp_path / "official.pt")
        loaded = load_encoder(tmp_path / "official.pt", num_heads=2)
        assert (loaded.img_size, loaded.num_frames) == (256, 16)
        x = torch.randn(2, 3, 8, 64, 64)
        assert torch.equal(loaded(x), built(x))

    sincos = VisionTransformer(img_size=32, num_frames=4, **shape)
    with pytest.raises(ValueError, match=r"encoder expects clips \[B, 3, 4, 32, 32\], got \[2, 3, 8, 48, 48\]"):
        sincos(torch.randn(2, 3, 8, 48, 48))
    with pytest.raises(ValueError, match=r"encoder expects clips \[B, 3, T >= 2, H >= 8, W >= 8\], got \[2, 3, 1, "):
        built(torch.randn(2, 3, 1, 32, 32))
