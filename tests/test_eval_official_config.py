"""Official eval configs load unchanged and select their protocol (V-JEPA 1: configs/evals/*.yaml, V-JEPA 2:
configs/eval/<model>/*.yaml)."""
import csv
import os
from pathlib import Path

import pytest
import yaml

from test_eval_end_to_end import tiny  # noqa: F401  (the module fixture)
from vjepa_fast import cli
from vjepa_fast.errors import UserError
from vjepa_fast.eval.official_config import read_eval_config

ANCHORS = Path(os.environ.get("VJEPA_FAST_OFFICIAL_DIR", "/nonexistent"))

# configs/eval/vitl/k400.yaml of V-JEPA 2 with two of its twenty multihead_kwargs entries, at the tiny test scale
V2_K400 = """
cpus_per_task: 16
eval_name: video_classification_frozen
folder: /your_folder/evals/vitl/k400
mem_per_gpu: 220G
nodes: 1
num_workers: 8
resume_checkpoint: true
tag: k400-vitl16-16x8x3-16f
tasks_per_node: 1
experiment:
  classifier:
    num_heads: 4
    num_probe_blocks: 4
  data:
    dataset_type: VideoDataset
    dataset_train: /your_data_path/k400_train_paths.csv
    dataset_val: /your_data_path/k400_val_paths.csv
    frame_step: 4
    frames_per_clip: 4
    num_classes: 8
    num_segments: 2
    num_views_per_segment: 3
    resolution: 32
  optimization:
    batch_size: 4
    multihead_kwargs:
    - final_lr: 0.0
      final_weight_decay: 0.01
      lr: 0.005
      start_lr: 0.005
      warmup: 0.0
      weight_decay: 0.01
    - final_lr: 0.0
      final_weight_decay: 0.1
      lr: 0.0001
      start_lr: 0.0001
      warmup: 0.0
      weight_decay: 0.1
    num_epochs: 2
    use_bfloat16: true
    use_pos_embed: false
model_kwargs:
  checkpoint: /your_vjepa2_checkpoints/vitl.pt
  module_name: evals.video_classification_frozen.modelcustom.vit_encoder_multiclip
  pretrain_kwargs:
    encoder:
      checkpoint_key: target_encoder
      img_temporal_dim_size: null
      model_name: vit_large
      patch_size: 16
      tubelet_size: 2
      uniform_power: true
      use_rope: true
  wrapper_kwargs:
    max_frames: 128
    use_pos_embed: false
"""


def test_a_v2_config_selects_the_v2_protocol(tmp_path):
    path = tmp_path / "k400.yaml"
    path.write_text(V2_K400)
    job = read_eval_config(str(path))
    s = job.settings
    assert job.version == 2 and s.depth == 4 and s.num_heads == 4 and s.clip_grad is None and s.decay_all
    assert [(h.lr, h.weight_decay, h.final_weight_decay) for h in s.heads()] == [(0.005, 0.01, 0.01),
                                                                                  (0.0001, 0.1, 0.1)]
    assert (job.resolution, job.frames_per_clip, job.frame_step, job.num_segments, job.num_views) == (32, 4, 4, 2, 3)
    assert s.batch_size == 4 and s.epochs == 2 and job.use_rope
    tree = yaml.safe_load(V2_K400)
    tree.update(nodes=8, tasks_per_node=8)  # the official run: 64 GPUs of 4 videos each
    (tmp_path / "64.yaml").write_text(yaml.safe_dump(tree))
    s = read_eval_config(str(tmp_path / "64.yaml")).settings
    assert (s.batch_size, s.micro_batch) == (256, 4)  # the global batch, computed 4 videos at a time


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
def test_single_probe_flags_are_refused_with_a_sweep(tmp_path, capsys, flag):
    path = tmp_path / "k400.yaml"
    path.write_text(V2_K400)
    assert cli.main(["eval", "--config", str(path), "--checkpoint", str(tmp_path / "none.pt"), flag, "0.1"]) == 2
    assert f"{flag} does not apply to {path}" in capsys.readouterr().err


def test_eval_runs_an_official_config_with_overridden_paths(tiny, tmp_path, capsys):
    _, data, checkpoint = tiny
    path = tmp_path / "k400.yaml"
    path.write_text(V2_K400)
    assert cli.main(["eval", "--config", str(path), "--checkpoint", str(checkpoint), "--train",
                     data.motion_train_csv, "--val", data.motion_val_csv, "--out-dir", str(tmp_path / "out"),
                     "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0",
                     "--micro-batch", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "V-JEPA 2 protocol" in out and "best of 2 probes" in out
    with open(tmp_path / "out" / "attentive.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["best_probe"] in ("0", "1") for r in rows)


def test_unsupported_settings_are_named(tmp_path):
    tree = yaml.safe_load(V2_K400)
    tree["model_kwargs"]["module_name"] = ("evals.video_classification_frozen.modelcustom."
                                           "vit_encoder_multiclip_multilevel")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(UserError, match="model_kwargs.module_name='evals.*multilevel'"):
        read_eval_config(str(tmp_path / "bad.yaml"))


@pytest.mark.skipif(not (ANCHORS / "vjepa2").is_dir(), reason="VJEPA_FAST_OFFICIAL_DIR does not name the official code")
def test_every_official_classification_config_loads_unchanged():
    loaded = {}
    for path in sorted((ANCHORS / "jepa" / "configs" / "evals").glob("*.yaml")) + sorted(
            (ANCHORS / "vjepa2" / "configs" / "eval").glob("*/*.yaml")):
        try:
            loaded[f"{path.parent.name}/{path.name}"] = read_eval_config(str(path))
        except UserError as error:  # multilevel probes and action anticipation are other protocols
            assert "multilevel" in str(error) or "eval_name='action_anticipation_frozen'" in str(error), error
    k400 = loaded["vitl/k400.yaml"]
    assert (k400.settings.depth, k400.settings.num_heads, len(k400.settings.heads()), k400.settings.batch_size,
            k400.resolution, k400.num_segments, k400.num_views) == (4, 16, 20, 256, 256, 8, 3)
    assert loaded["vitg-384/ssv2.yaml"].frames_per_clip == 64 and loaded["vitg-384/ssv2.yaml"].resolution == 384
    assert loaded["vitl/in1k.yaml"].kind == "image" and loaded["vitl/in1k.yaml"].settings.batch_size == 1024
    v1 = loaded["evals/vitl16_k400_16x8x3.yaml"]
    assert (v1.version, v1.settings.depth, v1.settings.clip_grad, v1.settings.batch_size, v1.frame_step,
            v1.resolution) == (1, 1, 1.0, 256, 4, 224)
    assert v1.settings.micro_batch == 4 and k400.settings.micro_batch == 4
    assert loaded["evals/vitl16_in1k.yaml"].settings.head.weight_decay == 0.001
    assert len(loaded) == 15 + 8  # V-JEPA 1's 15; V-JEPA 2's 14 less 2 x (diving48, jester: multilevel; ek100)
