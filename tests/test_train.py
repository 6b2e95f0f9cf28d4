import csv

import pytest
import torch
import yaml

from helpers import TINY
from vjepa_fast import cli, kernels
from vjepa_fast.checkpoint import load_checkpoint
from vjepa_fast.config import load_config
from vjepa_fast.model import VJEPA
from vjepa_fast.train import train


def _cfg(dataset, *extra):
    return load_config("demo", [*TINY, f"data.datasets=[{dataset.motion_train_csv}]",
                                "logging.checkpoint_every=2", *extra])


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_resumed_run_replays_the_uninterrupted_one(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset)
    full = train(cfg, tmp_path / "full", max_steps=6, progress=False)
    train(cfg, tmp_path / "split", max_steps=3, progress=False)
    resumed = train(cfg, tmp_path / "split", max_steps=6, resume=True, progress=False)
    assert resumed.start_step == 3 and resumed.end_step == 6 == full.end_step
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    assert [s for s, _ in _losses(tmp_path / "full")] == list(range(6))
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 6
    for net in ("encoder", "predictor", "target_encoder"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"


def test_run_directory_contents(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, "optimization.warmup=0")  # clipping active from step 0
    result = train(cfg, tmp_path / "run", max_steps=3, progress=False)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 0 and (run / "train.log").exists()
    assert load_config(run / "config.yaml") == cfg
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert float(rows[0]["lr"]) == pytest.approx(cfg.optimization.lr, rel=1e-3)
    assert float(rows[0]["momentum"]) == pytest.approx(0.998)
    assert all(float(r["clips_per_s"]) > 0 and float(r["grad_norm_encoder"]) > 0 for r in rows)
    assert result.first_loss == pytest.approx(float(rows[0]["loss"]), abs=1e-6)
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert {"encoder", "predictor", "target_encoder", "optimizer", "rng", "config", "step"} <= set(state)


@pytest.mark.parametrize("computation, fused", [("fast", True), ("reference", False)])
def test_ema_moves_the_target_towards_the_encoder(tiny_dataset, tmp_path, monkeypatch, computation, fused):
    """target = m * target + (1 - m) * encoder with m = 0.75 (a swapped m gives 0.25 / 0.75): through the fused
    kernel over flat buffers (fast), and through torch._foreach_lerp_ (reference)."""
    calls = {"kernel": 0, "foreach": 0}
    kernel, foreach = kernels.ema_, torch._foreach_lerp_
    monkeypatch.setattr(kernels, "ema_", lambda *a: calls.update(kernel=calls["kernel"] + 1) or kernel(*a))
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.update(foreach=calls["foreach"] + 1) or foreach(*a))
    cfg = _cfg(tiny_dataset, "optimization.ema=[0.75, 0.75]", "optimization.warmup=0",
               f"meta.computation={computation}")
    train(cfg, tmp_path / "run", max_steps=1, progress=False)
    assert calls == ({"kernel": 1, "foreach": 0} if fused else {"kernel": 0, "foreach": 1})
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    torch.manual_seed(cfg.meta.seed)
    init = VJEPA(cfg).encoder.state_dict()  # same seed: the initial weights of the run
    assert init.keys() == state["target_encoder"].keys()
    for key, start in init.items():
        expected = 0.75 * start + 0.25 * state["encoder"][key]
        torch.testing.assert_close(state["target_encoder"][key], expected, rtol=1e-6, atol=1e-7, msg=key)
    moved = state["encoder"]["blocks.0.attn.qkv.weight"] - init["blocks.0.attn.qkv.weight"]
    assert moved.abs().max() > 1e-5  # 100x the tolerance: the step moved the encoder, so a wrong weight shows


def test_existing_checkpoint_needs_resume_or_overwrite(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset)
    train(cfg, tmp_path / "run", max_steps=1, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run", max_steps=2, progress=False)
    assert train(cfg, tmp_path / "other", resume=True, max_steps=1, progress=False).start_step == 0  # fresh
    assert train(cfg, tmp_path / "run", max_steps=1, overwrite=True, progress=False).end_step == 1


def test_cli_trains_and_reports_errors(tiny_dataset, tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "cli"), "--max-steps", "2", "--no-progress"]
    sets = [x for o in [*TINY, f"data.datasets=[{tiny_dataset.motion_train_csv}]"] for x in ("--set", o)]
    assert cli.main(args + sets) == 0
    assert "loss" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["model"]["embed_dim"] == 32
    assert cli.main(["train", "--set", "data.crop_size=30"]) == 2
    assert "data.crop_size=30" in capsys.readouterr().err


def test_fast_run_tracks_the_reference_run(tiny_dataset, tmp_path):
    runs = {}
    for computation in ("reference", "fast"):
        cfg = _cfg(tiny_dataset, f"meta.computation={computation}")
        train(cfg, tmp_path / computation, max_steps=6, progress=False)
        runs[computation] = [loss for _, loss in _losses(tmp_path / computation)]
    deviation = max(abs(a - b) / abs(a) for a, b in zip(runs["reference"], runs["fast"]))
    assert len(runs["fast"]) == 6 and deviation < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("compile_blocks", [False, True])
def test_fast_bf16_training_on_cuda(tiny_dataset, tmp_path, compile_blocks):
    """bf16 fast training tracks bf16 reference training within a few noise floors, step by step: the floor is how
    far the reference run moves when only its reduction order changes (eager attention instead of SDPA's kernel)."""
    runs = {"fast": ["meta.computation=fast", f"model.compile={str(compile_blocks).lower()}"],
            "reference": ["meta.computation=reference"],
            "reference_reordered": ["meta.computation=reference", "model.attn_backend=eager"]}
    losses = {}
    for name, overrides in runs.items():
        cfg = _cfg(tiny_dataset, "logging.log_every=1", *overrides)
        result = train(cfg, tmp_path / name, max_steps=4, device="cuda", progress=False)
        assert result.end_step == 4 and result.skipped_steps == 0, name
        losses[name] = [loss for _, loss in _losses(tmp_path / name)]
    assert len(losses["fast"]) == 4 and all(0 < loss < 10 for loss in losses["fast"])
    ref = losses["reference"]
    floor = max(abs(a - b) / b for a, b in zip(losses["reference_reordered"], ref))
    deviation = max(abs(a - b) / b for a, b in zip(losses["fast"], ref))
    assert deviation <= 8 * max(floor, 1e-5), f"fast off the reference by {deviation:.2e}, noise floor {floor:.2e}"
    state = load_checkpoint(tmp_path / "fast" / "checkpoints" / "latest.pt")
    assert not torch.equal(state["encoder"]["blocks.0.attn.qkv.weight"],
                           state["target_encoder"]["blocks.0.attn.qkv.weight"])  # EMA lags the encoder
