import os

import pytest
import torch

from helpers import save_networks, tiny_config
from vjepa_fast.checkpoint import (TrainingState, export_official, import_official, load_checkpoint, load_encoder,
                                   save_checkpoint, strip_official_prefixes)
from vjepa_fast.model import VJEPA


def _official_state(model):
    """A checkpoint laid out as the official code saves it (DDP `module.` around `backbone.` wrappers)."""
    return {"encoder": {f"module.backbone.{k}": v for k, v in model.encoder.state_dict().items()},
            "predictor": {f"module.backbone.{k}": v for k, v in model.predictor.state_dict().items()},
            "target_encoder": {f"module.backbone.{k}": v for k, v in model.target_encoder.state_dict().items()},
            "opt": {}, "scaler": None, "epoch": 7, "loss": 0.5, "batch_size": 24, "world_size": 8, "lr": 1e-4}


def test_save_is_atomic_and_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "latest.pt"
    save_checkpoint({"step": 1}, path)
    assert load_checkpoint(path)["step"] == 1

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(path.parent)) == ["latest.pt", "latest.pt.sha256"]  # no temp file left behind


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_checkpoint(tmp_path / "nothere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)


def test_official_import_round_trip(tmp_path):
    torch.manual_seed(0)
    source = VJEPA(tiny_config())
    for p in source.parameters():
        p.data.normal_()
    torch.save(_official_state(source), tmp_path / "official.pth.tar")
    imported = import_official(tmp_path / "official.pth.tar")
    assert imported["epoch"] == 7 and "predictor_embed.weight" in imported["predictor"]
    target = VJEPA(tiny_config())
    target.load_networks(imported)
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    # and back out: our export is read by the importer unchanged
    ours = {k: getattr(source, k).state_dict() for k in ("encoder", "predictor", "target_encoder")}
    export_official(TrainingState(3, tiny_config().to_dict(), ours, {}, {}, {}, 0), tmp_path / "exported.pt")
    again = import_official(tmp_path / "exported.pt")
    assert all(torch.equal(again["encoder"][k], v) for k, v in ours["encoder"].items())


def test_mismatched_keys_and_shapes_are_named(tmp_path):
    model = VJEPA(tiny_config())
    state = _official_state(model)
    del state["encoder"]["module.backbone.blocks.1.attn.proj.bias"]
    state["predictor"]["module.backbone.predictor_proj.weight"] = torch.zeros(3, 3)
    state["target_encoder"]["module.backbone.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    imported = import_official(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"encoder: missing keys \['blocks.1.attn.proj.bias'\]"):
        model.load_networks({"encoder": imported["encoder"]})
    with pytest.raises(ValueError, match=r"predictor_proj.weight: checkpoint \(3, 3\) vs model \(32, 16\)"):
        model.load_networks({"predictor": imported["predictor"]})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        model.load_networks({"target_encoder": imported["target_encoder"]})
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an official V-JEPA checkpoint"):
        import_official(tmp_path / "foreign.pt")


def test_prefix_stripping():
    sd = strip_official_prefixes({"module.backbone.norm.weight": 1, "backbone.module.x": 2, "plain": 3})
    assert sd == {"norm.weight": 1, "x": 2, "plain": 3}


def test_load_encoder_from_official_format_and_ours(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = VJEPA(cfg)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(_official_state(model), tmp_path / "official.pt")
    save_networks(model, cfg, tmp_path / "ours.pt")
    clips = torch.randn(2, 3, 4, 32, 32)
    expected = model.target_encoder(clips)
    for path in ("official.pt", "ours.pt"):
        enc = load_encoder(tmp_path / path, num_frames=4, num_heads=2)
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())
        out = enc(clips)
        assert out.shape == (2, 32, 32)
        torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="pass num_heads"):
        load_encoder(tmp_path / "official.pt", num_frames=4)
    with pytest.raises(ValueError, match="pass the num_frames"):
        load_encoder(tmp_path / "official.pt", num_frames=6, num_heads=2)
    with pytest.raises(ValueError, match="'encoder' or 'target_encoder'"):
        load_encoder(tmp_path / "ours.pt", key="predictor")


def test_export_then_continue_pretraining_from_the_official_file(tiny_dataset, tmp_path):
    from vjepa_fast import cli
    from vjepa_fast.optim import build_optimizer
    from vjepa_fast.train import train

    data = f"data.datasets=[{tiny_dataset.motion_train_csv}]"
    train(tiny_config(data), tmp_path / "run", max_steps=2, progress=False)
    ours = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "latest.pt"),
                     "--out", str(tmp_path / "official.pth.tar")]) == 0
    raw = torch.load(tmp_path / "official.pth.tar", weights_only=False)
    assert {"encoder", "predictor", "target_encoder", "opt", "epoch", "batch_size", "lr"} <= set(raw)
    assert all(k.startswith("module.backbone.") for k in raw["encoder"])
    # the official optimizer state drops into our optimizer (same param groups, same order)
    model = VJEPA(tiny_config(data))
    build_optimizer(tiny_config(data).optimization, model.encoder, model.predictor).load_state_dict(raw["opt"])
    # continue pretraining from it (lr 0: the networks must start, and stay, at the exported weights)
    cfg = tiny_config(data, "meta.load_checkpoint=true", f"meta.read_checkpoint={tmp_path / 'official.pth.tar'}",
                      "optimization.start_lr=0", "optimization.lr=0", "optimization.final_lr=0")
    train(cfg, tmp_path / "continued", max_steps=1, progress=False)
    cont = load_checkpoint(tmp_path / "continued" / "checkpoints" / "latest.pt")
    for net in ("encoder", "predictor"):
        assert all(torch.equal(v, cont[net][k]) for k, v in ours[net].items())
