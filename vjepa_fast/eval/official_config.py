"""Official eval configs read unchanged: V-JEPA 1's configs/evals/*.yaml and V-JEPA 2's configs/eval/<model>/*.yaml
(video_classification_frozen with the multiclip encoder, image_classification_frozen) -> what `vjepa-fast eval`
runs. The config selects the protocol: V-JEPA 1's (one attentive block, the encoder's heads, lr / weight-decay
cosine, gradient clipping, biases without decay) or V-JEPA 2's (classifier.num_probe_blocks and num_heads, one
probe per multihead_kwargs entry trained on the same encoder pass and the best reported, weight decay on every
parameter, no clipping). The batch is the config's per-GPU batch_size x nodes x tasks_per_node, as the official
runs, computed in micro-batches of the per-GPU batch_size. Cluster keys (cpus, memory, output folder, tag, resume)
do not change the result and are not used; settings that would change the protocol in ways this package does not
implement are refused, naming the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from ..errors import UserError
from .protocols import HeadSettings, ProbeSettings

MULTICLIP = "evals.video_classification_frozen.modelcustom.vit_encoder_multiclip"
IMAGE_ENCODER = "evals.image_classification_frozen.modelcustom.vit_encoder"
EVAL_NAMES = {"video_classification_frozen": "video", "image_classification_frozen": "image"}
# The official eval code's defaults for keys a config may omit (V-JEPA 1 reads the frame step from
# pretrain.frame_step, V-JEPA 2 from experiment.data.frame_step)
FRAME_STEP = 4
FRAMES_PER_CLIP = 16
RESOLUTION = 224


@dataclass
class EvalJob:
    """One official eval config, as our eval runs it."""
    kind: str  # "video" or "image"
    train: str | None  # dataset files (videos)
    val: str | None
    image_folder: str | None  # ImageFolder root with train/ and val/ (images)
    num_classes: int
    checkpoint: str
    checkpoint_key: str
    encoder_frames: int  # frames the encoder is built for (images: the frames each image is repeated into)
    use_rope: bool | None
    resolution: int
    frames_per_clip: int
    frame_step: int
    num_segments: int
    num_views: int
    settings: ProbeSettings
    version: int  # 1 or 2


class _Tree:
    """Dotted look-ups into a YAML tree with errors naming the file and the key."""

    def __init__(self, tree: dict, path: str):
        self.tree, self.path = tree, path

    def get(self, key: str, default=KeyError):
        node = self.tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is KeyError:
                    raise UserError(f"{self.path}: missing key {key}")
                return default
            node = node[part]
        return node

    def require(self, key: str, allowed, default=None) -> None:
        value = self.get(key, default)
        if value not in allowed:
            raise UserError(f"{self.path}: {key}={value!r} is not supported "
                            f"(supported: {', '.join(map(repr, allowed))})")


def read_eval_config(path: str) -> EvalJob:
    """The EvalJob of an official eval YAML (V-JEPA 1 or 2, told apart by V-JEPA 2's `experiment` section)."""
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read eval config {path}: {error}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: not a YAML mapping")
    t = _Tree(tree, path)
    t.require("eval_name", tuple(EVAL_NAMES))
    world = int(t.get("nodes", 1)) * int(t.get("tasks_per_node", 1))
    return _v2(t, world) if "experiment" in tree else _v1(t, world)


def _image_root(t: _Tree, data: str) -> str:
    return os.path.join(t.get(f"{data}.root_path"), t.get(f"{data}.image_folder"))


def _v1(t: _Tree, world: int) -> EvalJob:
    kind = EVAL_NAMES[t.get("eval_name")]
    t.require("pretrain.clip_duration", (None,))
    if kind == "video":
        t.require("optimization.attend_across_segments", (True,), False)
    head = HeadSettings(lr=t.get("optimization.lr"), final_lr=t.get("optimization.final_lr"),
                        weight_decay=t.get("optimization.weight_decay"), start_lr=t.get("optimization.start_lr"),
                        warmup=t.get("optimization.warmup", 0.0))
    per_gpu = t.get("optimization.batch_size")
    settings = ProbeSettings(epochs=t.get("optimization.num_epochs"), batch_size=per_gpu * world,
                             micro_batch=per_gpu, head=head)
    video = kind == "video"
    if t.get("pretrain.frames_per_clip", 1) == 1:
        raise UserError(f"{t.path}: pretrain.frames_per_clip=1 (a per-frame image encoder) is not supported")
    return EvalJob(
        kind=kind, train=t.get("data.dataset_train") if video else None,
        val=t.get("data.dataset_val") if video else None, image_folder=None if video else _image_root(t, "data"),
        num_classes=t.get("data.num_classes"),
        checkpoint=os.path.join(t.get("pretrain.folder"), t.get("pretrain.checkpoint")),
        checkpoint_key=t.get("pretrain.checkpoint_key", "target_encoder"),
        encoder_frames=t.get("pretrain.frames_per_clip", 1), use_rope=False,
        resolution=t.get("optimization.resolution" if video else "data.resolution", RESOLUTION),
        frames_per_clip=(t.get("data.frames_per_clip", FRAMES_PER_CLIP) if video
                         else t.get("pretrain.frames_per_clip", 1)),
        frame_step=t.get("pretrain.frame_step", FRAME_STEP), num_segments=t.get("data.num_segments", 1),
        num_views=t.get("data.num_views_per_segment", 1), settings=settings, version=1)


def _v2(t: _Tree, world: int) -> EvalJob:
    kind = EVAL_NAMES[t.get("eval_name")]
    video = kind == "video"
    t.require("model_kwargs.module_name", (MULTICLIP,) if video else (IMAGE_ENCODER,))
    t.require("model_kwargs.wrapper_kwargs.use_pos_embed", (False,), False)
    t.require("experiment.optimization.use_pos_embed", (False,), False)
    t.require("experiment.data.clip_duration", (None,))
    t.require("experiment.data.normalization", (None,))
    heads = t.get("experiment.optimization.multihead_kwargs")
    if not isinstance(heads, list) or not heads:
        raise UserError(f"{t.path}: experiment.optimization.multihead_kwargs must be a non-empty list")
    sweep = tuple(HeadSettings(lr=kw["lr"], final_lr=kw["final_lr"], weight_decay=kw["weight_decay"],
                               final_weight_decay=kw["final_weight_decay"], start_lr=kw["start_lr"],
                               warmup=kw["warmup"]) for kw in heads)
    per_gpu = t.get("experiment.optimization.batch_size")
    settings = ProbeSettings(epochs=t.get("experiment.optimization.num_epochs"), batch_size=per_gpu * world,
                             micro_batch=per_gpu, sweep=sweep,
                             depth=t.get("experiment.classifier.num_probe_blocks", 1),
                             num_heads=t.get("experiment.classifier.num_heads", 16), clip_grad=None, decay_all=True)
    encoder = "model_kwargs.pretrain_kwargs.encoder"
    frames = (t.get("experiment.data.frames_per_clip", FRAMES_PER_CLIP) if video
              else t.get("model_kwargs.wrapper_kwargs.img_as_video_nframes"))
    return EvalJob(
        kind=kind, train=t.get("experiment.data.dataset_train") if video else None,
        val=t.get("experiment.data.dataset_val") if video else None,
        image_folder=None if video else _image_root(t, "experiment.data"),
        num_classes=t.get("experiment.data.num_classes"), checkpoint=t.get("model_kwargs.checkpoint"),
        checkpoint_key=t.get(f"{encoder}.checkpoint_key", "target_encoder"), encoder_frames=frames,
        use_rope=t.get(f"{encoder}.use_rope", False), resolution=t.get("experiment.data.resolution", RESOLUTION),
        frames_per_clip=frames, frame_step=t.get("experiment.data.frame_step", FRAME_STEP),
        num_segments=t.get("experiment.data.num_segments", 1),
        num_views=t.get("experiment.data.num_views_per_segment", 1), settings=settings, version=2)
