"""Frozen-eval training throughput at the demo size: clips/s through the frozen encoder and the probes.

Rows (batch of 8 videos x 2 segments of 8 frames at 64 px, the demo encoder: width 192, depth 6, 3 heads):
- ours, end to end: synthetic videos decoded and augmented as the official protocol (eval/online.py), the encoder,
  one V-JEPA 1 probe (fit_probe's step);
- ours, encoder + probes on ready clips: one V-JEPA 1 probe, and V-JEPA 2's sweep (20 probes of 4 blocks on one
  encoder pass);
- official, encoder + probes on ready clips (with --official DIR holding jepa/ and vjepa2/): V-JEPA 1's and 2's
  run_one_epoch (evals/video_classification_frozen/eval.py) with their ClipAggregation and AttentiveClassifier(s),
  run in a subprocess with stand-ins for timm, torchvision, cv2 and decord (the loop does not use them).
python -m bench.eval_throughput [--official DIR] [--batches 4] [--rounds 5] [--no-sweep]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

from vjepa_fast.eval.features import FeatureSet, encode
from vjepa_fast.eval.online import EncodedBatches
from vjepa_fast.eval.protocols import HeadSettings, ProbeSettings, fit_probe
from vjepa_fast.eval.run import dataset_file_split
from vjepa_fast.eval.views import ViewSpec
from vjepa_fast.models import VisionTransformer
from vjepa_fast.synthetic import ensure_synthetic_dataset

BATCH, SEGMENTS, FRAMES, SIZE, WIDTH, DEPTH, HEADS, CLASSES = 8, 2, 8, 64, 192, 6, 3, 8
SWEEP = 20


def _encoder() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=SIZE, num_frames=FRAMES, patch_size=8, tubelet_size=2, embed_dim=WIDTH,
                             depth=DEPTH, num_heads=HEADS).eval().requires_grad_(False)


class ReadyBatches:
    """Training batches of fixed random clips through the encoder (the compute without decoding)."""

    def __init__(self, encoder, batches: int):
        g = torch.Generator().manual_seed(0)
        self.clips = torch.randn(BATCH * SEGMENTS, 3, FRAMES, SIZE, SIZE, generator=g)
        self.encoder, self.batches = encoder, batches
        self.labels = torch.arange(BATCH * batches).numpy() % CLASSES

    def __len__(self):
        return self.batches

    def epoch(self, epoch):
        for i in range(self.batches):
            tokens = encode(self.encoder, self.clips)  # the fast pass, as fit_probe's sources run it
            yield BATCH, iter([(tokens.reshape(BATCH, -1, WIDTH), torch.arange(BATCH) % CLASSES)])


def _val(encoder) -> FeatureSet:
    tokens = torch.zeros(1, 1, SEGMENTS * encoder.num_patches, WIDTH).numpy().astype("float16")
    return FeatureSet(tokens, rows=torch.zeros(1, dtype=torch.long).numpy(), labels=torch.zeros(1).long().numpy(),
                      path="")


def _clips_per_s(train, settings: ProbeSettings, encoder) -> float:
    """Clips (video segments) per second of a second run of fit_probe (the first warms up)."""
    for _ in range(2):
        t0 = time.perf_counter()
        fit_probe("attentive", train, _val(encoder), num_classes=CLASSES, num_heads=HEADS, settings=settings,
                  progress=False)
    return len(train) * BATCH * SEGMENTS * settings.epochs / (time.perf_counter() - t0)


def ours(batches: int) -> dict:
    """Our loops' rows: name -> a function measuring it."""
    encoder = _encoder()
    v1 = ProbeSettings(epochs=1, batch_size=BATCH)
    v2 = ProbeSettings(epochs=1, batch_size=BATCH, sweep=(HeadSettings(),) * SWEEP, depth=4, clip_grad=None,
                       decay_all=True)
    split = dataset_file_split(ensure_synthetic_dataset(progress=False).motion_train_csv)
    online = EncodedBatches(encoder, split.paths[:BATCH * batches], split.labels[:BATCH * batches],
                            ViewSpec(FRAMES, 4, SIZE, SEGMENTS), kind="video", batch_size=BATCH, micro_batch=BATCH,
                            seed=0, device=torch.device("cpu"), num_workers=1)
    return {"ours, end to end (decode + augment + encoder + 1 probe)": lambda: _clips_per_s(online, v1, encoder),
            "ours, encoder + 1 probe (V-JEPA 1)": lambda: _clips_per_s(ReadyBatches(encoder, batches), v1, encoder),
            f"ours, encoder + {SWEEP} probes of 4 blocks (V-JEPA 2)":
                lambda: _clips_per_s(ReadyBatches(encoder, batches), v2, encoder)}


OFFICIAL = """
import json, sys, time, types
import torch
for name in ("timm", "timm.models", "timm.models.layers", "torchvision", "torchvision.transforms",
             "torchvision.transforms.functional", "cv2", "decord"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["timm.models.layers"].drop_path = lambda x, drop_prob=0.0, training=False: x
sys.path.insert(0, ROOT)
import src.models.vision_transformer as vit
from src.models.attentive_pooler import AttentiveClassifier
import evals.video_classification_frozen.eval as ev
if VERSION == 1:
    from evals.video_classification_frozen.utils import ClipAggregation
    wrap = lambda m: ClipAggregation(m, tubelet_size=2, attend_across_segments=True)
else:
    from evals.video_classification_frozen.modelcustom.vit_encoder_multiclip import ClipAggregation
    wrap = lambda m: ClipAggregation(m, tubelet_size=2)
torch.manual_seed(0)
encoder = wrap(vit.VisionTransformer(img_size=SIZE, patch_size=8, num_frames=FRAMES, tubelet_size=2, embed_dim=WIDTH,
                                     depth=DEPTH, num_heads=HEADS, uniform_power=True, use_sdpa=True)).eval()
for p in encoder.parameters():
    p.requires_grad = False
g = torch.Generator().manual_seed(0)
clips = [[torch.randn(BATCH, 3, FRAMES, SIZE, SIZE, generator=g)] for _ in range(SEGMENTS)]  # [segment][view]
batch = (clips, torch.arange(BATCH) % CLASSES, [torch.zeros(BATCH, FRAMES, dtype=torch.long)] * SEGMENTS)
def run(batches):
    if VERSION == 1:
        c = AttentiveClassifier(embed_dim=WIDTH, num_heads=HEADS, depth=1, num_classes=CLASSES)
        opt, scaler, sched, wd_sched = ev.init_opt(c, batches, 1e-3, 1e-3, 0, 1, wd=0.01, use_bfloat16=False)
        ev.run_one_epoch(device=torch.device("cpu"), training=True, encoder=encoder, classifier=c, scaler=scaler,
                         optimizer=opt, scheduler=sched, wd_scheduler=wd_sched, data_loader=[batch] * batches,
                         use_bfloat16=False, num_spatial_views=1, num_temporal_views=SEGMENTS,
                         attend_across_segments=True)
    else:
        cs = [AttentiveClassifier(embed_dim=WIDTH, num_heads=HEADS, depth=4, num_classes=CLASSES,
                                  use_activation_checkpointing=True) for _ in range(SWEEP)]  # as its main()
        kw = [dict(ref_wd=0.01, final_wd=0.01, start_lr=1e-3, ref_lr=1e-3, final_lr=0.0, warmup=0.0)] * SWEEP
        opt, scaler, sched, wd_sched = ev.init_opt(cs, batches, kw, 1, use_bfloat16=False)
        ev.run_one_epoch(device=torch.device("cpu"), training=True, encoder=encoder, classifiers=cs, scaler=scaler,
                         optimizer=opt, scheduler=sched, wd_scheduler=wd_sched, data_loader=[batch] * batches,
                         use_bfloat16=False)
run(1)
t0 = time.perf_counter()
run(BATCHES)
print(json.dumps(BATCHES * BATCH * SEGMENTS / (time.perf_counter() - t0)))
"""


def official(root: str, version: int, batches: int) -> float:
    consts = dict(ROOT=os.path.join(root, "jepa" if version == 1 else "vjepa2"), VERSION=version, BATCHES=batches,
                  BATCH=BATCH, SEGMENTS=SEGMENTS, FRAMES=FRAMES, SIZE=SIZE, WIDTH=WIDTH, DEPTH=DEPTH, HEADS=HEADS,
                  CLASSES=CLASSES, SWEEP=SWEEP)
    code = "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + textwrap.dedent(OFFICIAL)
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                              env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", metavar="DIR", help="folder holding the official jepa/ and vjepa2/ sources")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="measure every row this many times, interleaved")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the (slow) V-JEPA 2 sweep rows")
    args = parser.parse_args()
    rows = ours(args.batches)
    if args.official:
        rows["official V-JEPA 1 run_one_epoch, encoder + 1 probe"] = lambda: official(args.official, 1, args.batches)
        rows[f"official V-JEPA 2 run_one_epoch, encoder + {SWEEP} probes of 4 blocks"] = lambda: official(
            args.official, 2, args.batches)
    if args.no_sweep:
        rows = {name: measure for name, measure in rows.items() if f"{SWEEP} probes" not in name}
    runs = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, measure in rows.items():
            runs[name].append(measure())
            print(f"{name}: {runs[name][-1]:.2f} clips/s", file=sys.stderr, flush=True)
    print(f"| loop (batch {BATCH} videos x {SEGMENTS} clips of {FRAMES} frames, {SIZE} px, torch threads "
          f"{torch.get_num_threads()}) | clips/s, median (runs) |\n|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)}) |")


if __name__ == "__main__":
    main()
