"""Small shared builders for tests: tiny configs and models that run in milliseconds on CPU, and training runs in
a subprocess (for tests that kill them)."""
import csv
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from vjepa_fast import kernels

from vjepa_fast.checkpoint import TrainingState, save_training_state
from vjepa_fast.config import load_config
from vjepa_fast.masks import MaskGenerator
from vjepa_fast.model import NETWORKS

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1",
        "model.pred_embed_dim=16", "data.crop_size=32", "data.patch_size=8", "data.num_frames=4",
        "data.batch_size=3", "data.num_workers=0"]
# A V-JEPA 2 recipe (load_config("vjepa2_vitl16", ...)) at TINY's scale: a width 3D RoPE takes (head dim 24), its
# three datasets of one clip length, random mask tokens (so that a decay of an unused one would show).
V2_TINY = [*TINY, "model.embed_dim=48", "model.pred_embed_dim=24", "model.pred_num_heads=2", "data.fps=8",
           "data.dataset_fpcs=[4, 4, 4]", "model.zero_init_mask_tokens=false",
           "model.use_activation_checkpointing=false"]
# A ViT-S width (head dim 64, as the flash / varlen kernels like it) at TINY's depth-and-size scale.
SMALL = ["model.model_name=vit_small", "model.embed_dim=null", "model.depth=4", "model.num_heads=null",
         "model.pred_embed_dim=48", "model.pred_depth=2"]


def tiny_config(*overrides):
    return load_config("demo", [*TINY, *overrides])


def v2_tiny_config(*overrides):
    """The vjepa2_vitl16 recipe at V2_TINY's scale with `overrides`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report of the recipe's cluster keys
        return load_config("vjepa2_vitl16", [*V2_TINY, *overrides])


def tiny_batch(cfg, step=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    clips = torch.randn(d.batch_size, 3, d.num_frames, d.crop_size, d.crop_size, generator=g)
    gen = MaskGenerator(cfg.mask, d.crop_size, d.num_frames, d.patch_size, d.tubelet_size)
    masks_enc, masks_pred = gen.gen(d.batch_size, step, generator=g)
    return clips, masks_enc, masks_pred


def save_networks(model, cfg, path, step=0):
    """One of our checkpoints holding `model`'s networks (no optimizer state): what load_encoder and eval read."""
    networks = {name: getattr(model, name).state_dict() for name in NETWORKS}
    return save_training_state(TrainingState(step, cfg.to_dict(), networks, optimizer={}, rng={}, health={},
                                             skipped_steps=0), path)


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # CPU subprocesses take the kernels' PyTorch references: faster
    return env


def start_training(run_dir, max_steps, overrides, resume=False):
    """`vjepa-fast train` of the demo config with `overrides` in a subprocess (stdout and stderr merged)."""
    cmd = [sys.executable, "-m", "vjepa_fast.cli", "train", "--run-dir", str(run_dir), "--max-steps", str(max_steps),
           "--no-progress", *(["--resume"] if resume else [])]
    cmd += [x for o in overrides for x in ("--set", o)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())


def run_training(run_dir, max_steps, overrides, resume=False):
    proc = start_training(run_dir, max_steps, overrides, resume=resume)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def metric_rows(run_dir):
    """The run's metrics.csv rows (none before the first flush)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training ended early: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


# Triton kernels run on CUDA, and on CPU tensors only under the Triton interpreter.
KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.runs_on("cpu"), reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]

# Kernel parity shapes: sequence lengths 1, 7, 1023, 1568; D from 64 to 1408; masks of unequal K.
KERNEL_SMALL_SHAPES = [  # (B, N, D, K per mask)
    (1, 1, 64, (1,)),
    (3, 7, 64, (7, 1)),
    (2, 7, 100, (3, 4)),
    (2, 7, 192, (3, 7, 5)),
    (2, 7, 384, (2, 6)),
    (1, 7, 1024, (7, 4)),
    (2, 7, 1280, (1, 7)),
    (1, 7, 1408, (5, 3)),
]
KERNEL_LARGE_SHAPES = [  # one dtype each: the interpreter is slow
    ((1, 1568, 1408, (1568, 1023)), torch.float32),
    ((2, 1023, 1024, (1023, 7)), torch.bfloat16),
    ((1, 1568, 1280, (760, 1120)), torch.bfloat16),
    ((3, 1568, 384, (368, 1023, 112)), torch.float32),
]
