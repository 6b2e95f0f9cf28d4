"""Starting a run from another run's checkpoint as the official trainers do: a V-JEPA 2 cooldown from
`optimization.anneal_ckpt` (networks and optimizer state, our fused AdamW kept), and `meta.load_checkpoint` with
`meta.read_checkpoint` resuming the whole training state (optimizer, step, schedules), from our files and from
files in the official layout (`vjepa-fast export`). The same from files the official code wrote:
tests/test_vjepa2_official.py."""
import csv
import shutil

import pytest
import torch

from helpers import tiny_config, v2_tiny_config
from vjepa_fast import cli
from vjepa_fast.checkpoint import load_checkpoint
from vjepa_fast.errors import UserError
from vjepa_fast.model import VJEPA
from vjepa_fast.optim import adapt_optimizer_state, build_optimizer
from vjepa_fast.train import train

# a warmup of one 3-step epoch, so a run that started its schedules again would show it in the lr
SCHEDULE = ["optimization.ipe=3", "optimization.epochs=2", "optimization.warmup=1", "optimization.start_lr=0.0002",
            "optimization.lr=0.001", "optimization.final_lr=0.001", "logging.log_every=1",
            "logging.checkpoint_every=2"]


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"]), float(r["momentum"])) for r in csv.DictReader(f)]


def _adam_steps(state):
    return sorted({int(s["step"]) for s in state["optimizer"]["state"].values()})


def _export(checkpoint, out):
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def v2_runs(tiny_dataset, tmp_path_factory):
    """A tiny V-JEPA 2 recipe: 5 uninterrupted steps, and the first 3 of them (checkpoints at steps 2 and 3)."""
    root = tmp_path_factory.mktemp("v2")
    csv_file = tiny_dataset.motion_train_csv
    sets = [f"data.datasets=[{csv_file}, {csv_file}, {csv_file}]", *SCHEDULE]
    train(v2_tiny_config(*sets), root / "straight", max_steps=5, progress=False)
    train(v2_tiny_config(*sets), root / "first", max_steps=3, progress=False)
    return root, sets


def test_read_checkpoint_resumes_our_file_at_its_step(v2_runs, caplog):
    root, sets = v2_runs
    first = root / "first" / "checkpoints"
    shutil.copy(first / "step_00000002.pt", root / "at_step_2.pt")
    cfg = v2_tiny_config(*sets, "meta.load_checkpoint=true", f"meta.read_checkpoint={root / 'at_step_2.pt'}")
    caplog.set_level("INFO", logger="vjepa_fast.train")
    result = train(cfg, root / "second", max_steps=5, progress=False)
    assert result.start_step == 2
    assert f"meta.read_checkpoint={root / 'at_step_2.pt'}: resumed encoder, predictor, target_encoder, the " \
           f"optimizer state at step 2 (its step, RNG and health monitor)" in caplog.text
    assert _rows(root / "second") == _rows(root / "straight")[2:]  # what the uninterrupted run trained, exactly
    a, b = (load_checkpoint(root / run / "checkpoints" / "latest.pt") for run in ("straight", "second"))
    assert _adam_steps(b) == _adam_steps(a) == [5]
    for net in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(v, b[net][k]) for k, v in a[net].items()), net


def test_read_checkpoint_resumes_an_official_layout_file_at_its_epoch(v2_runs, caplog):
    """The official trainers resume at the file's completed epochs x ipe: step 3 here (1 epoch of 3 steps)."""
    root, sets = v2_runs
    exported = _export(root / "first" / "checkpoints" / "latest.pt", root / "e1.pth.tar")
    cfg = v2_tiny_config(*sets, "meta.load_checkpoint=true", f"meta.read_checkpoint={exported}")
    caplog.set_level("INFO", logger="vjepa_fast.train")
    assert train(cfg, root / "from_official", max_steps=5, progress=False).start_step == 3
    assert "at step 3 (an official file: its epoch 1 x optimization.ipe=3)" in caplog.text
    straight = _rows(root / "straight")[3:]
    resumed = _rows(root / "from_official")
    assert [(s, lr, m) for s, _, lr, m in resumed] == [(s, lr, m) for s, _, lr, m in straight]
    assert [loss for _, loss, _, _ in resumed] == pytest.approx([loss for _, loss, _, _ in straight], rel=1e-6)
    state = load_checkpoint(root / "from_official" / "checkpoints" / "latest.pt")
    assert _adam_steps(state) == [5] and all(g["fused"] for g in state["optimizer"]["param_groups"])


def test_a_cooldown_from_an_official_layout_file_keeps_our_fused_adamw(v2_runs):
    root, sets = v2_runs
    exported = _export(root / "first" / "checkpoints" / "latest.pt", root / "pretrain.pth.tar")
    raw = torch.load(exported, weights_only=True)
    assert [g["fused"] for g in raw["opt"]["param_groups"]] == [None] * 4  # the official AdamW's settings
    cooldown = v2_tiny_config(*sets, "optimization.is_anneal=true", f"optimization.anneal_ckpt={exported}",
                              "optimization.final_lr=0.0", "optimization.warmup=0")
    result = train(cooldown, root / "cooldown", max_steps=2, progress=False)
    assert (result.start_step, result.end_step) == (0, 2)
    state = load_checkpoint(root / "cooldown" / "checkpoints" / "latest.pt")
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    assert _adam_steps(state) == [3 + 2]  # the pretraining's 3 AdamW steps carried on


def test_optimizer_state_keeps_our_settings_and_names_a_file_that_does_not_fit():
    cfg = tiny_config()
    model = VJEPA(cfg)
    source = build_optimizer(cfg.optimization, model.encoder, model.predictor, fused=False)
    saved = source.state_dict()
    for group in saved["param_groups"]:
        group["betas"] = (0.5, 0.6)  # the file's hyperparameters are taken, as the official loader takes them
    ours = build_optimizer(cfg.optimization, model.encoder, model.predictor)
    ours.load_state_dict(adapt_optimizer_state(ours, saved, "file.pt"))
    assert all(g["fused"] and g["betas"] == (0.5, 0.6) for g in ours.param_groups)
    other = VJEPA(tiny_config("model.pred_embed_dim=8"))
    p = other.predictor.predictor_embed.weight
    p.grad = torch.ones_like(p)
    wrong = build_optimizer(cfg.optimization, other.encoder, other.predictor)
    wrong.step()
    with pytest.raises(UserError, match=r"file.pt: optimizer state \d+ \(exp_avg\) has shape \(8, 32\), its "
                                        r"parameter \(16, 32\)"):
        adapt_optimizer_state(ours, wrong.state_dict(), "file.pt")
    fewer = {"state": {}, "param_groups": saved["param_groups"][:2]}
    with pytest.raises(UserError, match="file.pt: its optimizer state has parameter groups of"):
        adapt_optimizer_state(ours, fewer, "file.pt")


def test_vjepa1_reads_its_checkpoint_in_the_run_directory_as_the_official_trainer(tiny_dataset, tmp_path):
    data = [f"data.datasets=[{tiny_dataset.motion_train_csv}]", *SCHEDULE]
    train(tiny_config(*data), tmp_path / "first", max_steps=3, progress=False)
    run = tmp_path / "second"
    run.mkdir()
    _export(tmp_path / "first" / "checkpoints" / "latest.pt", run / "e1.pth.tar")
    cfg = tiny_config(*data, "meta.load_checkpoint=true", "meta.read_checkpoint=e1.pth.tar")
    assert train(cfg, run, max_steps=4, progress=False).start_step == 3
    with pytest.raises(UserError, match=r"meta.read_checkpoint=e1.pth.tar: no such file \(.*other/e1.pth.tar\)"):
        train(cfg, tmp_path / "other", max_steps=4, progress=False)
