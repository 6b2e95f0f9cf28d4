"""Training configuration: dataclasses mirroring the official V-JEPA and V-JEPA 2 pretrain YAML, validated on load.

A user's existing official YAML loads as it is: the sections and key names are the official ones
(`data`, `data_aug`, `mask`, `meta`, `model`, `optimization`, `loss`, `logging`); keys this project adds
have defaults. Every official key is honoured (some under this project's name: OFFICIAL_ALIASES), or refused when
it asks for something not supported, or, for the keys only the official cluster launcher reads, reported once as
not used here (NOT_USED_HERE); keys nobody knows produce one warning naming them. A key the file leaves out takes
the default of the official trainer the file is for (OFFICIAL_DEFAULTS: V-JEPA 2's for a file with
`data.dataset_fpcs`, which only V-JEPA 2 reads, else V-JEPA 1's). Every invalid value fails at load with a message
naming the key and the value.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from .dali_pipelines.choose import LOADERS
from .errors import UserError
from .health import COLLAPSE_FRACTION
from .model import COMPUTATIONS
from .models.build import MODEL_SIZES, ROPE_ALIASES
from .models.packed import ATTENTION_BACKENDS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped configs (package data)

DTYPES = ("bfloat16", "float32")  # the compute dtype on CUDA; CPU runs compute in fp32
DATA_PARALLEL = ("ddp", "fsdp")  # how torchrun ranks hold the networks: replicas, or FSDP2 shards
TRUNCATIONS = ("lowest", "random")
RENAMED = {"meta.path": "meta.computation"}  # keys of earlier versions: refused, naming the new key
# Official keys read here under this project's name.
OFFICIAL_ALIASES = {"model.use_activation_checkpointing": "model.activation_checkpointing",
                    "model.compile_model": "model.compile", "folder": "logging.folder"}
# Official keys that change nothing here: the cluster launcher's, and those whose behaviour is fixed here.
NOT_USED_HERE = {"nodes": "the launcher's (torchrun / srun set the processes)",
                 "tasks_per_node": "the launcher's", "cpus_per_task": "the launcher's", "mem_per_gpu": "the launcher's",
                 "meta.eval_freq": "the official training loop does not read it either",
                 "meta.sync_gc": "garbage collection timing", "data.pin_mem": "clips are pinned whenever CUDA is there",
                 "data.persistent_workers": "the loader's workers always persist", "logging.write_tag": "file names"}
APPS = ("vjepa", "vjepa2")  # the official trainers: V-JEPA 1's and V-JEPA 2's app/vjepa/train.py
NO_DEFAULT = "no default"  # OFFICIAL_DEFAULTS: that trainer gives the key no default (the dataclass default stands)
# What each official trainer takes for a key the file leaves out (under this project's key names, OFFICIAL_ALIASES):
# its `.get(key, default)`, or for the data loader's keys it does not pass on, init_data's argument default.
# The dataclass defaults below are the V-JEPA 1 column; tests/test_official_defaults.py reads both from the official
# files. (The NOT_USED_HERE keys change nothing here and keep this project's defaults.)
OFFICIAL_DEFAULTS: dict[str, tuple[Any, Any]] = {  # key: (V-JEPA 1, V-JEPA 2)
    "data.dataset_type": ("videodataset", "videodataset"),
    "data.datasets": ([], []),
    "data.datasets_weights": (None, NO_DEFAULT),
    "data.crop_size": (224, 224),
    "data.num_workers": (1, 1),
    "data.filter_short_videos": (False, False),
    "data.filter_long_videos": (10**9, 10**9),
    "data.clip_duration": (None, None),
    "data.decode_one_clip": (True, NO_DEFAULT),
    "data_aug.random_resize_aspect_ratio": ((3 / 4, 4 / 3), (3 / 4, 4 / 3)),
    "data_aug.random_resize_scale": ((0.3, 1.0), (0.3, 1.0)),
    "data_aug.motion_shift": (False, False),
    "data_aug.reprob": (0.0, 0.0),
    "data_aug.auto_augment": (False, False),
    "meta.read_checkpoint": (None, None),
    "meta.seed": (0, 0),
    "meta.save_every_freq": (-1, -1),
    "meta.skip_batches": (-1, -1),
    "meta.use_sdpa": (False, False),
    "model.compile": (NO_DEFAULT, False),
    "model.activation_checkpointing": (NO_DEFAULT, False),
    "model.pred_num_heads": (NO_DEFAULT, None),
    "model.uniform_power": (True, False),
    "model.use_mask_tokens": (True, False),
    "model.zero_init_mask_tokens": (True, True),
    "model.use_rope": (NO_DEFAULT, False),
    "model.use_silu": (NO_DEFAULT, False),
    "model.use_pred_silu": (NO_DEFAULT, False),
    "model.wide_silu": (NO_DEFAULT, True),
    "optimization.ipe": (None, None),  # None: one pass over the data (the loader's length)
    "optimization.ipe_scale": (1.0, 1.0),
    "optimization.clip_grad": (None, NO_DEFAULT),  # V-JEPA 2 never clips
    "optimization.betas": ((0.9, 0.999), (0.9, 0.999)),
    "optimization.eps": (1e-8, 1e-8),
    "optimization.is_anneal": (NO_DEFAULT, False),
    "optimization.anneal_ckpt": (NO_DEFAULT, None),
    "optimization.resume_anneal": (NO_DEFAULT, False),
}


def _v1(key: str):
    """The V-JEPA 1 trainer's default for `key`: the dataclass default."""
    return OFFICIAL_DEFAULTS[key][0]


class ConfigError(UserError):
    """An invalid configuration value; the message names the key and the value."""


@dataclass
class DataConfig:
    dataset_type: str = _v1("data.dataset_type")
    datasets: list[str] = field(default_factory=list)  # empty: the embedded synthetic dataset
    datasets_weights: Optional[list[float]] = _v1("data.datasets_weights")
    decode_one_clip: bool = _v1("data.decode_one_clip")
    batch_size: int = 24
    num_clips: int = 1
    num_frames: int = 16  # V-JEPA 2 configs: max(dataset_fpcs)
    dataset_fpcs: Optional[list[int]] = None  # V-JEPA 2: frames per clip, one per dataset (None: num_frames for all)
    tubelet_size: int = 2
    sampling_rate: Optional[int] = 4  # frames between two sampled frames (null with data.fps)
    fps: Optional[float] = None  # V-JEPA 2: frames sampled at this rate in time instead (step = ceil(video fps) // fps)
    clip_duration: Optional[float] = _v1("data.clip_duration")  # V-JEPA 1: seconds a clip spans, instead of the step
    crop_size: int = _v1("data.crop_size")
    patch_size: int = 16
    pin_mem: bool = True
    persistent_workers: bool = True
    num_workers: int = _v1("data.num_workers")
    filter_short_videos: bool = _v1("data.filter_short_videos")  # skip videos shorter than a clip's span
    filter_long_videos: int = _v1("data.filter_long_videos")  # skip video files of more bytes
    loader: str = "auto"
    min_frames: Optional[int] = None  # skip videos with fewer frames (None: none skipped for their length)


@dataclass
class DataAugConfig:
    auto_augment: bool = _v1("data_aug.auto_augment")
    motion_shift: bool = _v1("data_aug.motion_shift")
    random_resize_aspect_ratio: tuple[float, float] = _v1("data_aug.random_resize_aspect_ratio")
    random_resize_scale: tuple[float, float] = _v1("data_aug.random_resize_scale")
    reprob: float = _v1("data_aug.reprob")
    horizontal_flip: bool = True


@dataclass
class MaskConfig:
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
    num_blocks: int = 8
    spatial_scale: tuple[float, float] = (0.15, 0.15)
    temporal_scale: tuple[float, float] = (1.0, 1.0)
    max_temporal_keep: float = 1.0
    max_keep: Optional[int] = None
    truncation: str = "lowest"  # batch-min cut: "lowest" (official) or "random"
    full_complement: bool = False  # V-JEPA 2 options, not supported when true (their default is false)
    pred_full_complement: bool = False
    inv_block: bool = False


def official_masks() -> list[MaskConfig]:
    """The masks of the official V-JEPA configs: 8 small blocks (15% of the area each) and 2 large ones (70%)."""
    return [MaskConfig(num_blocks=8, spatial_scale=(0.15, 0.15)),
            MaskConfig(num_blocks=2, spatial_scale=(0.7, 0.7))]


@dataclass
class MetaConfig:
    load_checkpoint: bool = False
    read_checkpoint: Optional[str] = _v1("meta.read_checkpoint")
    seed: int = _v1("meta.seed")
    eval_freq: int = 100
    use_sdpa: bool = _v1("meta.use_sdpa")  # false: plain attention math (model.attn_backend eager), as official
    dtype: str = "bfloat16"
    computation: str = "fast"  # the loss: "fast" (packed masks, fused kernels) or "reference" (the official one)
    data_parallel: str = "ddp"  # under torchrun: "ddp" (replicated networks) or "fsdp" (FSDP2, sharded per block)
    dist_timeout_minutes: float = 30.0  # a rank waiting longer than this for another one fails, naming it
    save_every_freq: int = _v1("meta.save_every_freq")  # epochs between checkpoints kept for good (logging.keep_every)
    skip_batches: int = _v1("meta.skip_batches")
    sync_gc: bool = False


@dataclass
class ModelConfig:
    model_name: str = "vit_large"
    pred_depth: int = 12
    pred_embed_dim: int = 384
    uniform_power: bool = _v1("model.uniform_power")
    use_mask_tokens: bool = _v1("model.use_mask_tokens")
    zero_init_mask_tokens: bool = _v1("model.zero_init_mask_tokens")
    # Custom sizes beside the named ones (None: take the value of model_name).
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    pred_num_heads: Optional[int] = None  # None: the encoder's heads, as the official code
    attn_backend: str = "sdpa"
    compile: bool = False  # fast path: torch.compile the blocks' row-wise parts (dynamic token count)
    activation_checkpointing: bool = False  # fast path: recompute block activations in the backward
    # Official quirk kept for parity: under autocast the predictor's residual stream is fp32.
    predictor_fp32_residual: bool = True
    use_rope: bool = False  # V-JEPA 2: 3D rotary positions in every attention instead of added sin-cos tables
    use_silu: bool = False  # V-JEPA 2 options, not supported when true
    use_pred_silu: bool = False
    wide_silu: bool = True


@dataclass
class OptimizationConfig:
    ipe: Optional[int] = _v1("optimization.ipe")  # steps per epoch; None: one pass over the data (resolve_ipe)
    ipe_scale: float = _v1("optimization.ipe_scale")
    clip_grad: Optional[float] = _v1("optimization.clip_grad")
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    epochs: int = 300
    warmup: float = 40
    start_lr: float = 2e-4
    lr: float = 6.25e-4
    final_lr: float = 1e-6
    ema: tuple[float, float] = (0.998, 1.0)
    betas: tuple[float, float] = _v1("optimization.betas")
    eps: float = _v1("optimization.eps")
    max_consecutive_nonfinite: int = 10  # skipped non-finite steps in a row before the run stops
    accumulation_steps: int = 1  # micro-batches of data.batch_size per step and rank (gradients summed)
    # V-JEPA 2 cooldown: start from anneal_ckpt (networks and optimizer) with the lr decaying linearly to final_lr
    is_anneal: bool = False
    anneal_ckpt: Optional[str] = None
    resume_anneal: bool = False  # continue a cooldown from the run's own checkpoint when there is one


@dataclass
class LossConfig:
    loss_exp: float = 1.0
    reg_coeff: float = 0.0


@dataclass
class LoggingConfig:
    folder: Optional[str] = None
    write_tag: str = "jepa"
    checkpoint_every: int = 200  # steps
    keep_last: int = 2  # checkpoints kept: latest.pt and the ones before it as step_<N>.pt
    keep_every: int = 0  # steps between checkpoints kept for good (0: none)
    log_every: int = 10  # steps between metric flushes (one host sync each) and progress-bar refreshes
    health_every: int = 25  # steps between measurements of the target features' spreads (collapse monitor; 0: off)
    collapse_fraction: float = COLLAPSE_FRACTION  # warn when the token spread falls under this share of its early value


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    data_aug: DataAugConfig = field(default_factory=DataAugConfig)
    mask: list[MaskConfig] = field(default_factory=official_masks)
    meta: MetaConfig = field(default_factory=MetaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Official top-level keys, kept so a round trip preserves them.
    app: str = "vjepa"
    nodes: Optional[int] = None
    tasks_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_per_gpu: Optional[str] = None
    name: str = "config"  # the YAML file's stem; names the default run directory (unless logging.folder)

    # ---- derived values -------------------------------------------------------------------------
    @property
    def encoder_size(self) -> tuple[int, int, int, float]:
        """(embed_dim, depth, num_heads, mlp_ratio) after custom overrides."""
        dim, depth, heads, ratio = MODEL_SIZES[self.model.model_name]
        m = self.model
        return (m.embed_dim or dim, m.depth or depth, m.num_heads or heads, m.mlp_ratio or ratio)

    @property
    def total_steps(self) -> int:
        """Steps actually trained: epochs x iterations per epoch (once resolve_ipe gave optimization.ipe)."""
        if self.optimization.ipe is None:
            raise ValueError("optimization.ipe is null (one pass over the data): resolve_ipe(cfg, steps) first")
        return self.optimization.epochs * self.optimization.ipe

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ---- building dataclasses from plain data, with type checks --------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str, unknown: list):
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, unknown)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", unknown) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", unknown) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, unknown)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads '1e-6' (no dot) as a string: accept any string that parses as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config field type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str, unknown: list):
    """Instantiate dataclass `cls` from `data`; keys it does not have are appended to `unknown`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            unknown.append(key)
            continue
        kwargs[k] = _coerce(v, hints[k], key, unknown)
    return cls(**kwargs)


# ---- validation ---------------------------------------------------------------------------------

def _check(ok: bool, key: str, value, why: str):
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def _check_range(key: str, pair: Sequence[float], lo: float, hi: float, lo_open: bool = True):
    for v in pair:
        inside = (v > lo if lo_open else v >= lo) and v <= hi
        _check(inside, key, list(pair), f"values must lie in {'(' if lo_open else '['}{lo}, {hi}]")
    _check(pair[0] <= pair[1], key, list(pair), "the first value must not exceed the second")


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the first invalid key and value."""
    d, m, o = cfg.data, cfg.model, cfg.optimization
    _check(m.model_name in MODEL_SIZES, "model.model_name", m.model_name,
           f"unknown model; choose one of {', '.join(MODEL_SIZES)}")
    for key in ("batch_size", "num_frames", "tubelet_size", "crop_size", "patch_size"):
        _check(getattr(d, key) > 0, f"data.{key}", getattr(d, key), "must be positive")
    _check(d.sampling_rate is None or d.sampling_rate > 0, "data.sampling_rate", d.sampling_rate,
           "must be positive, or null with data.fps")
    _check(d.sampling_rate is not None or d.fps is not None or d.clip_duration is not None, "data.sampling_rate",
           d.sampling_rate, "null needs data.fps or data.clip_duration (the frames are sampled by one of them)")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.crop_size % d.patch_size == 0, "data.crop_size", d.crop_size,
           f"must be divisible by data.patch_size={d.patch_size}")
    _check(d.num_frames % d.tubelet_size == 0, "data.num_frames", d.num_frames,
           f"must be divisible by data.tubelet_size={d.tubelet_size}")
    _check(d.num_clips == 1, "data.num_clips", d.num_clips, "pretraining uses one clip per video")
    _check(d.loader in LOADERS, "data.loader", d.loader, f"choose one of {', '.join(LOADERS)}")
    if d.min_frames is not None:
        _check(d.min_frames >= 1, "data.min_frames", d.min_frames, "must be >= 1")
    if d.datasets_weights is not None:
        _check(len(d.datasets_weights) == len(d.datasets), "data.datasets_weights", d.datasets_weights,
               f"needs one weight per dataset ({len(d.datasets)})")
        _check(all(w > 0 for w in d.datasets_weights), "data.datasets_weights", d.datasets_weights,
               "weights must be positive")
    if d.dataset_fpcs is not None:
        _check(len(d.dataset_fpcs) == max(1, len(d.datasets)), "data.dataset_fpcs", d.dataset_fpcs,
               f"needs one clip length per dataset ({max(1, len(d.datasets))})")
        _check(all(f > 0 and f % d.tubelet_size == 0 for f in d.dataset_fpcs), "data.dataset_fpcs",
               d.dataset_fpcs, f"every clip length must be a positive multiple of data.tubelet_size={d.tubelet_size}")
        _check(d.num_frames == max(d.dataset_fpcs), "data.num_frames", d.num_frames,
               f"must be the longest of data.dataset_fpcs={d.dataset_fpcs} (it sizes the networks)")
        _check(len(set(d.dataset_fpcs)) == 1 or cfg.model.use_rope, "data.dataset_fpcs", d.dataset_fpcs,
               "clips of several lengths need model.use_rope=true (a sin-cos table has one length)")
    _check(d.fps is None or d.fps > 0, "data.fps", d.fps, "must be > 0 or null")
    _check(d.clip_duration is None or d.clip_duration > 0, "data.clip_duration", d.clip_duration, "must be > 0 or null")
    _check(d.filter_long_videos >= 1, "data.filter_long_videos", d.filter_long_videos, "must be >= 1 (bytes)")
    _check(d.dataset_type.lower() == "videodataset", "data.dataset_type", d.dataset_type,
           "only VideoDataset is supported")
    _check(d.decode_one_clip, "data.decode_one_clip", d.decode_one_clip, "only true is supported (one clip per video)")

    a = cfg.data_aug
    _check_range("data_aug.random_resize_scale", a.random_resize_scale, 0.0, 1.0)
    _check(0 < a.random_resize_aspect_ratio[0] <= a.random_resize_aspect_ratio[1],
           "data_aug.random_resize_aspect_ratio", list(a.random_resize_aspect_ratio),
           "must be positive and increasing")
    for key in ("auto_augment", "motion_shift"):
        _check(not getattr(a, key), f"data_aug.{key}", getattr(a, key), "not supported (the paper does not use it)")
    _check(a.reprob == 0.0, "data_aug.reprob", a.reprob, "random erasing is not supported (the paper does not use it)")

    _check(len(cfg.mask) >= 1, "mask", cfg.mask, "needs at least one mask config")
    for i, mk in enumerate(cfg.mask):
        p = f"mask[{i}]"
        _check_range(f"{p}.spatial_scale", mk.spatial_scale, 0.0, 1.0)
        _check_range(f"{p}.temporal_scale", mk.temporal_scale, 0.0, 1.0)
        _check(0 < mk.aspect_ratio[0] <= mk.aspect_ratio[1], f"{p}.aspect_ratio", list(mk.aspect_ratio),
               "must be positive and increasing")
        _check(mk.num_blocks >= 1, f"{p}.num_blocks", mk.num_blocks, "must be >= 1")
        _check(0 < mk.max_temporal_keep <= 1, f"{p}.max_temporal_keep", mk.max_temporal_keep, "must lie in (0, 1]")
        _check(mk.max_keep is None or mk.max_keep >= 1, f"{p}.max_keep", mk.max_keep, "must be >= 1 or null")
        _check(mk.truncation in TRUNCATIONS, f"{p}.truncation", mk.truncation,
               f"choose one of {', '.join(TRUNCATIONS)}")
        for key in ("full_complement", "pred_full_complement", "inv_block"):
            _check(not getattr(mk, key), f"{p}.{key}", getattr(mk, key),
                   "not supported (the shipped recipes use false)")

    _check(cfg.meta.computation in COMPUTATIONS, "meta.computation", cfg.meta.computation,
           f"choose one of {', '.join(COMPUTATIONS)}")
    _check(cfg.meta.computation == "reference" or cfg.loss.loss_exp >= 1, "loss.loss_exp", cfg.loss.loss_exp,
           "the fused loss needs loss_exp >= 1; use meta.computation=reference for smaller exponents")
    _check(cfg.meta.data_parallel in DATA_PARALLEL, "meta.data_parallel", cfg.meta.data_parallel,
           f"choose one of {', '.join(DATA_PARALLEL)}")
    _check(cfg.meta.dist_timeout_minutes > 0, "meta.dist_timeout_minutes", cfg.meta.dist_timeout_minutes,
           "must be > 0")
    _check(cfg.meta.dtype in DTYPES, "meta.dtype", cfg.meta.dtype, f"choose one of {', '.join(DTYPES)}")
    _check(m.attn_backend in ATTENTION_BACKENDS, "model.attn_backend", m.attn_backend,
           f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    _check(m.use_mask_tokens, "model.use_mask_tokens", m.use_mask_tokens,
           "only the mask-token predictor (the paper's) is supported: set it true (a V-JEPA 2 file that leaves it "
           "out gets that trainer's default, false)")
    _check(m.use_rope or m.model_name not in ROPE_ALIASES, "model.use_rope", m.use_rope,
           f"model.model_name={m.model_name} is a RoPE model: use_rope must be true (or unset)")
    for key in ("use_silu", "use_pred_silu"):
        _check(not getattr(m, key), f"model.{key}", getattr(m, key), "not supported: the MLPs use GELU")
    _check(cfg.meta.skip_batches == -1, "meta.skip_batches", cfg.meta.skip_batches,
           "not supported: a resumed run continues exactly where it stopped")
    _check(cfg.app == "vjepa", "app", cfg.app, "only V-JEPA pretraining (app: vjepa) is supported")
    dim, depth, heads, ratio = cfg.encoder_size
    for key, v in (("embed_dim", dim), ("depth", depth), ("num_heads", heads), ("mlp_ratio", ratio),
                   ("pred_depth", m.pred_depth), ("pred_embed_dim", m.pred_embed_dim)):
        _check(v > 0, f"model.{key}", v, "must be positive")
    _check(dim % heads == 0, "model.num_heads", heads, f"must divide the embedding dim {dim}")
    pred_heads = m.pred_num_heads or heads
    _check(m.pred_embed_dim % pred_heads == 0, "model.pred_embed_dim", m.pred_embed_dim,
           f"must be divisible by the predictor's heads ({pred_heads})")
    if m.use_rope:  # each of time, height and width rotates 2 * ((head_dim // 3) // 2) >= 2 dims
        _check(dim // heads >= 6, "model.num_heads", heads, f"leaves {dim // heads} dims per head; 3D RoPE needs >= 6")
        _check(m.pred_embed_dim // pred_heads >= 6, "model.pred_num_heads", pred_heads,
               f"leaves {m.pred_embed_dim // pred_heads} dims per predictor head; 3D RoPE needs >= 6")

    _check(o.ipe is None or o.ipe >= 1, "optimization.ipe", o.ipe, "must be >= 1, or null (one pass over the data)")
    _check(o.epochs >= 1, "optimization.epochs", o.epochs, "must be >= 1")
    _check(o.ipe_scale >= 1.0, "optimization.ipe_scale", o.ipe_scale, "must be >= 1")
    _check(o.warmup >= 0 and math.isfinite(o.warmup), "optimization.warmup", o.warmup,
           "must be a finite number >= 0 (epochs; a warmup longer than the run ends the run inside it)")
    _check(not o.is_anneal or o.anneal_ckpt, "optimization.anneal_ckpt", o.anneal_ckpt,
           "optimization.is_anneal needs the pretraining checkpoint the cooldown starts from")
    for key in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay"):
        v = getattr(o, key)
        _check(v >= 0 and math.isfinite(v), f"optimization.{key}", v, "must be a finite number >= 0")
    _check(o.clip_grad is None or o.clip_grad > 0, "optimization.clip_grad", o.clip_grad, "must be > 0 or null")
    _check_range("optimization.ema", o.ema, 0.0, 1.0, lo_open=False)
    _check(all(0 <= b < 1 for b in o.betas), "optimization.betas", list(o.betas), "must lie in [0, 1)")
    _check(cfg.loss.loss_exp > 0, "loss.loss_exp", cfg.loss.loss_exp, "must be > 0")
    _check(cfg.loss.reg_coeff == 0.0, "loss.reg_coeff", cfg.loss.reg_coeff,
           "the variance regulariser is not supported (the paper trains with 0)")
    _check(cfg.logging.checkpoint_every >= 1, "logging.checkpoint_every", cfg.logging.checkpoint_every, "must be >= 1")
    _check(cfg.logging.log_every >= 1, "logging.log_every", cfg.logging.log_every, "must be >= 1")
    _check(cfg.logging.keep_last >= 1, "logging.keep_last", cfg.logging.keep_last, "must be >= 1 (latest.pt)")
    _check(cfg.logging.keep_every >= 0, "logging.keep_every", cfg.logging.keep_every, "must be >= 0 (0: none)")
    _check(cfg.logging.health_every >= 0, "logging.health_every", cfg.logging.health_every, "must be >= 0 (0: off)")
    _check(0 < cfg.logging.collapse_fraction < 1, "logging.collapse_fraction", cfg.logging.collapse_fraction,
           "must lie in (0, 1)")
    _check(o.accumulation_steps >= 1, "optimization.accumulation_steps", o.accumulation_steps, "must be >= 1")
    _check(o.max_consecutive_nonfinite >= 1, "optimization.max_consecutive_nonfinite", o.max_consecutive_nonfinite,
           "must be >= 1")
    return cfg


# ---- loading ------------------------------------------------------------------------------------

def _apply_override(tree: dict, assignment: str):
    """Apply one `section.key=value` (value parsed as YAML; list items by index: mask.0.num_blocks=4)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected section.key=value")
    path, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    parts = path.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {path!r}: {part!r} is not an index of a {len(node)}-item list")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {path!r}: {'.'.join(parts[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


_MISSING = object()


def _get(tree: dict, key: str, default=_MISSING):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(tree: dict, key: str, value) -> None:
    *sections, last = key.split(".")
    node = tree
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part}: expected a section, got {node!r}")
    node[last] = value


def _pop(tree: dict, key: str):
    *sections, last = key.split(".")
    node = _get(tree, ".".join(sections)) if sections else tree
    return node.pop(last) if isinstance(node, dict) and last in node else _MISSING


def official_app(tree: dict) -> str:
    """Which official trainer (APPS) a raw config is for: V-JEPA 2's when it has data.dataset_fpcs (which V-JEPA 2's
    trainer needs and V-JEPA 1's does not read), else V-JEPA 1's."""
    return "vjepa" if _get(tree, "data.dataset_fpcs", None) is None else "vjepa2"


def _keep_every(save_every_freq, ipe) -> int:
    """logging.keep_every (steps) for meta.save_every_freq (epochs) at `ipe` steps per epoch."""
    return save_every_freq * ipe


def _translate_official(tree: dict) -> dict:
    """The official conventions on the raw mapping: OFFICIAL_ALIASES moved to this project's keys, the official
    trainer's defaults for the keys left out (OFFICIAL_DEFAULTS), and the official keys that set others."""
    tree = copy.deepcopy(tree)
    for official, ours in OFFICIAL_ALIASES.items():
        value = _pop(tree, official)
        if value is _MISSING:
            continue
        given = _get(tree, ours)
        if given is not _MISSING and given != value:
            raise ConfigError(f"{official}={value!r} and {ours}={given!r} disagree (the first is the official name "
                              f"of the second)")
        _set(tree, ours, value)
    app = APPS.index(official_app(tree))
    if _get(tree, "meta.use_sdpa") is _MISSING and _get(tree, "model.attn_backend") is _MISSING:
        warnings.warn("meta.use_sdpa is absent: the official default (false) runs attention as plain math (eager), "
                      "far slower than meta.use_sdpa: true, which the official configs set", stacklevel=3)
    if _get(tree, "model.model_name", None) in ROPE_ALIASES and _get(tree, "model.use_rope") is _MISSING:
        _set(tree, "model.use_rope", True)  # the constructor turns it on
    for key, defaults in OFFICIAL_DEFAULTS.items():
        if defaults[app] is not NO_DEFAULT and _get(tree, key) is _MISSING:
            _set(tree, key, copy.deepcopy(defaults[app]))
    data = tree["data"]
    if data.get("dataset_fpcs") is not None:
        fpcs = data["dataset_fpcs"]
        if "num_frames" not in data and isinstance(fpcs, list) and fpcs and all(isinstance(f, int) for f in fpcs):
            data["num_frames"] = max(fpcs)
    if data.get("fps") is not None and data.get("sampling_rate") is not None:
        raise ConfigError(f"data.fps={data['fps']!r} and data.sampling_rate={data['sampling_rate']!r}: give one (a "
                          f"rate in time, or a frame step; sampling_rate: null)")
    if data.get("fps") is not None:
        data["sampling_rate"] = None  # V-JEPA 2's configs have no frame step
    if data.get("clip_duration") is not None and data.get("fps") is not None:
        raise ConfigError(f"data.fps={data['fps']!r} and data.clip_duration={data['clip_duration']!r}: give one")
    if _get(tree, "meta.use_sdpa") is False and _get(tree, "model.attn_backend") is _MISSING:
        _set(tree, "model.attn_backend", "eager")  # the plain attention math, unless a backend is chosen
    every, ipe = _get(tree, "meta.save_every_freq"), _get(tree, "optimization.ipe")
    if isinstance(every, int) and every > 0 and isinstance(ipe, int) and _get(tree, "logging.keep_every") is _MISSING:
        _set(tree, "logging.keep_every", _keep_every(every, ipe))  # with ipe null: resolve_ipe sets it
    return tree


def resolve_ipe(cfg: Config, steps_per_pass: int) -> Config:
    """A copy of `cfg`, whose optimization.ipe is null, with ipe `steps_per_pass` (the steps of one pass over the data,
    as the official trainers take the loader's length) and the logging.keep_every meta.save_every_freq asks for."""
    assert cfg.optimization.ipe is None, "optimization.ipe is already set"
    cfg = copy.deepcopy(cfg)
    cfg.optimization.ipe = steps_per_pass
    if cfg.meta.save_every_freq > 0 and cfg.logging.keep_every == 0:
        cfg.logging.keep_every = _keep_every(cfg.meta.save_every_freq, steps_per_pass)
    return validate(cfg)


def _not_used_here(cfg: Config) -> list[str]:
    """NOT_USED_HERE keys whose value differs from the default: what to report once."""
    plain, default = cfg.to_dict(), Config().to_dict()
    values = {key: _get(plain, key) for key in NOT_USED_HERE}
    return [f"{key}={value!r} ({NOT_USED_HERE[key]})" for key, value in values.items() if value != _get(default, key)]


def config_from_dict(tree: dict, name: str = "config") -> Config:
    """Build and validate a Config from a plain (YAML-loaded) mapping, official or ours."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config {name!r}: expected a mapping at the top level, got {type(tree).__name__}")
    tree = _translate_official(tree)
    tree.setdefault("name", name)
    unknown: list[str] = []
    cfg = _build(Config, tree, "", unknown)
    for old, new in RENAMED.items():
        if old in unknown:
            raise ConfigError(f"{old} was renamed {new}: rename the key in the config")
    if unknown:
        warnings.warn(f"unknown config keys ignored: {', '.join(unknown)}", stacklevel=2)
    not_used = _not_used_here(cfg)
    if not_used:
        warnings.warn(f"config keys not used here: {'; '.join(not_used)}", stacklevel=2)
    return validate(cfg)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or a shipped config by name (`demo`, `vitl16`, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{p.name}.yaml" if p.suffix == "" else CONFIG_DIR / p.name
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"config file not found: {path} (shipped configs: "
                            f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (a path or a shipped name), apply `section.key=value` overrides, validate."""
    p = resolve_config_path(path)
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        _apply_override(tree, assignment)
    tree["name"] = tree.get("name") or p.stem
    return config_from_dict(tree, name=tree["name"])


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
