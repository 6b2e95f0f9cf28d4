"""Frozen features: run an encoder once over every eval view of a dataset and cache the tokens on disk.

The cache holds float16 tokens [items, views, segments*N, D] in a .npy file (read back memory-mapped, so it may
exceed RAM) beside a .json that marks it complete. Its name is a hash of the encoder's weights, the item paths and
the ViewSpec, so several probes, epochs, and labelings of the same videos (the synthetic motion and appearance
labels) share one extraction. Labels are not part of the cache. Unusable items are logged (dali_pipelines'
SkipTracker, which also stops when most fail) and, as the official loaders do, replaced by another item (with
its label; a seeded draw among the usable ones), so train and val keep their size. The encoder runs fast (encode):
our packed computation under bfloat16 autocast on CUDA.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..dali_pipelines.bad_input import SkipTracker, VideoError
from ..dali_pipelines.loader import iterate, worker_options
from ..errors import UserError
from ..models import VisionTransformer
from ..synthetic import default_cache_dir
from .views import ViewSpec, image_views, video_views

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the extraction changes: old cache files are then ignored
LOADERS: dict[str, Callable[[str, ViewSpec], torch.Tensor]] = {"video": video_views, "image": image_views}


@dataclass
class FeatureSet:
    """Cached tokens of a dataset: sample i is tokens[rows[i]] ([views, segments*N, D]) with labels[i]."""
    tokens: np.ndarray  # float16 [items, views, segments*N, D], memory-mapped
    rows: np.ndarray  # int64 [K]: the item read for each sample (an unusable item's replacement)
    labels: np.ndarray  # int64 [K]
    path: str  # the cache file

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_views(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]


def encoder_for_frames(encoder: VisionTransformer, num_frames: int) -> VisionTransformer:
    """`encoder` for clips of `num_frames` (a multiple of its tubelet; <= its own with a pos-embed table): same
    weights, the first rows of its pos-embed. Exact for the sin-cos embedding, whose rows of a time-step do not
    depend on the clip length; lets a 16-frame encoder see 2-frame still images. A RoPE encoder has no table and
    takes any clip length: returned as it is."""
    if num_frames == encoder.num_frames or (encoder.use_rope and num_frames % encoder.tubelet_size == 0):
        return encoder
    if num_frames > encoder.num_frames or num_frames % encoder.tubelet_size:
        raise UserError(f"clips of {num_frames} frames need an encoder of at least that many frames and a tubelet "
                        f"that divides it; this encoder takes {encoder.num_frames} frames, tubelet "
                        f"{encoder.tubelet_size}")
    blk = encoder.blocks[0]
    short = VisionTransformer(img_size=encoder.img_size, num_frames=num_frames, patch_size=encoder.patch_size,
                              tubelet_size=encoder.tubelet_size, embed_dim=encoder.embed_dim, depth=len(encoder.blocks),
                              num_heads=encoder.num_heads, mlp_ratio=blk.mlp.fc1.out_features / encoder.embed_dim,
                              attn_backend=blk.attn.backend, use_rope=encoder.use_rope)
    state = dict(encoder.state_dict())
    if encoder.pos_embed is not None:
        state["pos_embed"] = state["pos_embed"][:, :short.num_patches]
    short.load_state_dict(state)
    return short.to(encoder.patch_embed.proj.weight.device).eval().requires_grad_(False)


def autocast(device: torch.device):
    """The probes' autocast: float16 on CUDA (the official evals' use_bfloat16), none on the CPU."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")


@torch.no_grad()
def encode(encoder: VisionTransformer, clips: torch.Tensor) -> torch.Tensor:
    """Tokens [B, N, D] of clips [B, 3, T, H, W] (on the encoder's device) through the frozen encoder, fast: our
    packed computation (the training step's, all tokens of each clip one sequence), under bfloat16 autocast on
    CUDA (the official evals: float16; the same features to bfloat16's precision), float32 on the CPU, where it
    equals the reference computation."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=clips.is_cuda):
        return encoder(clips, computation="fast")


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ViewDataset(torch.utils.data.Dataset):
    """Item i -> (i, views [V, S, 3, T, C, C] or None, (i, skip reason or None, detail))."""

    def __init__(self, paths: Sequence[str], spec: ViewSpec, kind: str):
        self.paths, self.spec, self.load = list(paths), spec, LOADERS[kind]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.load(self.paths[index], self.spec), (index, None, None)
        except VideoError as error:
            return index, None, (index, error.reason, error.detail)


def _collate(items):
    """Keep a batch as its list of items: unusable ones carry no views to stack."""
    return items


@torch.no_grad()
def extract(encoder: VisionTransformer, paths: Sequence[str], spec: ViewSpec, kind: str, out: np.ndarray, *,
            device: torch.device, batch_size: int, num_workers: int, progress: bool) -> np.ndarray:
    """Write the tokens of every item into `out` [items, V, S*N, D]; returns the bool mask of usable items."""
    encoder = encoder.to(device).eval()
    loader = torch.utils.data.DataLoader(ViewDataset(paths, spec, kind), batch_size=batch_size, collate_fn=_collate,
                                         **worker_options(num_workers))
    skips = SkipTracker(tuple(paths))
    usable = np.zeros(len(paths), dtype=bool)
    for batch in tqdm(iterate(loader), total=len(loader), desc=f"features ({kind})", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        skips.record([attempt for _, _, attempt in batch])
        good = [(index, views) for index, views, _ in batch if views is not None]
        if not good:
            continue
        clips = torch.stack([views for _, views in good]).to(device)  # [B, V, S, 3, T, C, C]
        B, V, S = clips.shape[:3]
        tokens = encode(encoder, clips.flatten(0, 2))  # [B*V*S, N, D]
        tokens = tokens.reshape(B, V, S * tokens.size(1), tokens.size(2))  # segments concatenated as tokens
        indices = [index for index, _ in good]
        out[indices] = tokens.to(torch.float16).cpu().numpy()
        usable[indices] = True
    return usable


def cached_features(encoder: VisionTransformer, paths: Sequence[str], labels: Sequence[int], spec: ViewSpec, *,
                    kind: str = "video", cache_dir: str | None = None, device: torch.device | str = "cpu",
                    batch_size: int = 8, num_workers: int = 1, progress: bool = True) -> FeatureSet:
    """The encoder's tokens for every item of `paths` (videos or images, per `kind`), from the cache when
    present, else extracted and cached (default cache: <user cache>/vjepa_fast/features). `spec.crop_size` must
    be the encoder's input size."""
    if kind not in LOADERS:
        raise ValueError(f"unknown item kind {kind!r}; choose one of {', '.join(LOADERS)}")
    if len(paths) != len(labels):
        raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
    if spec.crop_size != encoder.img_size:
        raise UserError(f"crop size {spec.crop_size} differs from the encoder's input size {encoder.img_size}")
    if kind == "image" and spec.num_segments != 1:
        raise UserError(f"images have one segment, got num_segments={spec.num_segments}")
    key = json.dumps({"version": CACHE_VERSION, "encoder": weights_digest(encoder), "kind": kind,
                      "spec": asdict(spec), "paths": [os.path.abspath(p) for p in paths]}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:20]
    cache_dir = cache_dir or os.path.join(default_cache_dir(), "features")
    npy, meta = os.path.join(cache_dir, f"{name}.npy"), os.path.join(cache_dir, f"{name}.json")
    if os.path.exists(meta):
        log.info("features: reusing %s", npy)
        with open(meta) as f:
            usable = np.asarray(json.load(f)["usable"], dtype=bool)
    else:
        clip_encoder = encoder_for_frames(encoder, spec.num_frames)
        tokens_per_clip = spec.num_frames // encoder.tubelet_size * (spec.crop_size // encoder.patch_size) ** 2
        shape = (len(paths), spec.num_views, spec.num_segments * tokens_per_clip, encoder.embed_dim)
        log.info("features: %d %ss x %d views x %d segments -> %.2f GiB at %s", len(paths), kind, spec.num_views,
                 spec.num_segments, np.prod(shape) * 2 / 2 ** 30, npy)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{npy}.tmp-{os.getpid()}"
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            usable = extract(clip_encoder, paths, spec, kind, out, device=torch.device(device),
                             batch_size=batch_size, num_workers=num_workers, progress=progress)
            out.flush()
            del out
            os.replace(tmp, npy)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        with open(f"{meta}.tmp-{os.getpid()}", "w") as f:
            json.dump({"usable": usable.tolist(), "shape": shape, "key": json.loads(key) | {"paths": len(paths)}}, f)
        os.replace(f"{meta}.tmp-{os.getpid()}", meta)  # written last: marks the cache complete
    rows = replace_unusable(usable)
    return FeatureSet(np.load(npy, mmap_mode="r"), rows, np.asarray(labels, dtype=np.int64)[rows], npy)


def replace_unusable(usable: np.ndarray) -> np.ndarray:
    """Row of each item: itself, or for an unusable one a usable item drawn at random, seeded (the official
    loaders draw another sample until one loads, and take its label)."""
    if not usable.any():
        return np.zeros(0, dtype=np.int64)
    rows = np.arange(len(usable))
    bad = np.flatnonzero(~usable)
    if len(bad):
        rows[bad] = np.random.RandomState(0).choice(np.flatnonzero(usable), len(bad))
        log.warning("features: %d unusable items replaced by other items, as the official loaders do", len(bad))
    return rows
