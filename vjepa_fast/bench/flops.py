"""Analytic FLOPs of one V-JEPA training step (what MFU divides by), per network and split into the linear layers
and attention.

Counted: every matmul (linear layers, the patch-embed convolution, the attention score and value products, which
fvcore does not count by itself) at 2 FLOPs per multiply-add. Not counted: norms, softmax, GELU, adds (a few
percent at most). Per network:
- target encoder: forward over all N tokens of each clip (no backward);
- context encoder: one patch embedding of the clip, blocks over each mask's K_ctx tokens; backward 2x forward
  except the patch embedding, whose input (the clip) needs no gradient (1x: weight gradient only);
- predictor: forward over K_ctx + K_tgt tokens per mask (embed on context rows, output projection on target
  rows), backward 2x forward.
The reference and fast computations compute the same function, so they have the same model FLOPs; the
reference's repeated patch embedding (once per mask) is not model work and is not counted. The tests check the
count against torch's FlopCounterMode and, where it is installed, fvcore's per-module table.
For ViT-L/16 at 224 px, 16 frames, batch 24 and the median official mask sizes this gives ~60 TFLOP
(target ~29, context ~21, predictor ~11; docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.build import PREDICTOR_MLP_RATIO


@dataclass(frozen=True)
class Flops:
    """FLOPs of one network's work in a step."""
    linear: float  # linear layers and the patch embedding
    attention: float  # attention scores and values

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.linear + other.linear, self.attention + other.attention)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.linear * k, self.attention * k)

    __rmul__ = __mul__


def block_forward_flops(tokens: int, dim: int, mlp_ratio: float) -> Flops:
    """One pre-norm block over one sequence: qkv, scores, values, proj, MLP."""
    hidden = int(dim * mlp_ratio)
    return Flops(linear=2.0 * tokens * dim * (3 * dim + dim + 2 * hidden), attention=2.0 * 2 * tokens * tokens * dim)


@dataclass(frozen=True)
class StepFlops:
    target: Flops  # forward
    context: Flops  # forward + backward
    predictor: Flops  # forward + backward

    @property
    def total(self) -> float:
        return self.target.total + self.context.total + self.predictor.total

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.target + other.target, self.context + other.context, self.predictor + other.predictor)

    def table(self) -> str:
        """Markdown: TFLOP per network, linear vs attention, and each network's share of the step."""
        lines = ["| network | linear TFLOP | attention TFLOP | total TFLOP | share |", "|---|---|---|---|---|"]
        for name, f in (("target encoder (fwd)", self.target), ("context encoder (fwd+bwd)", self.context),
                        ("predictor (fwd+bwd)", self.predictor)):
            lines.append(f"| {name} | {f.linear / 1e12:.4g} | {f.attention / 1e12:.4g} | {f.total / 1e12:.4g} | "
                         f"{f.total / self.total:.0%} |")
        lines.append(f"| step | | | {self.total / 1e12:.4g} | 100% |")
        return "\n".join(lines) + "\n"


def step_flops(cfg, ctx_lengths: list[int], tgt_lengths: list[int], batch: int | None = None,
               num_frames: int | None = None) -> StepFlops:
    """FLOPs of one step of `cfg` (a vjepa_fast Config) with masks of the given per-mask token counts, for `batch`
    clips of `num_frames` frames (default: the config's); a batch of several clip lengths is the sum per length."""
    d = cfg.data
    dim, depth, _, ratio = cfg.encoder_size
    pdim, pdepth = cfg.model.pred_embed_dim, cfg.model.pred_depth
    batch = batch or d.batch_size
    tokens = ((num_frames or d.num_frames) // d.tubelet_size) * (d.crop_size // d.patch_size) ** 2
    patch_in = 3 * d.tubelet_size * d.patch_size ** 2
    embed = Flops(linear=2.0 * tokens * patch_in * dim, attention=0.0)

    target = embed + depth * block_forward_flops(tokens, dim, ratio)
    context_blocks = sum((depth * block_forward_flops(k, dim, ratio) for k in ctx_lengths), Flops(0.0, 0.0))
    context = 2 * embed + 3 * context_blocks  # patch embed: forward + weight gradient only
    pred_fwd = Flops(0.0, 0.0)
    for kc, kt in zip(ctx_lengths, tgt_lengths):
        projections = Flops(linear=2.0 * kc * dim * pdim + 2.0 * kt * pdim * dim, attention=0.0)
        pred_fwd = pred_fwd + projections + pdepth * block_forward_flops(kc + kt, pdim, PREDICTOR_MLP_RATIO)
    return StepFlops(target=batch * target, context=batch * context, predictor=batch * 3 * pred_fwd)


def mean_flops(steps: list[StepFlops]) -> StepFlops:
    """The mean over steps, network by network."""
    n = len(steps)
    return StepFlops(*(sum((getattr(s, k) for s in steps), Flops(0.0, 0.0)) * (1 / n)
                       for k in ("target", "context", "predictor")))


def register_cpu_sdpa_flops() -> None:
    """Teach torch's FlopCounterMode the CPU flash-attention kernels (it counts only the CUDA ones), so measured
    counts on CPU include attention. Idempotent."""
    import torch
    from torch.utils import flop_counter as fc

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in fc.flop_registry:
        return

    @fc.register_flop_formula(fwd, get_raw=True)
    def _fwd(query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    @fc.register_flop_formula(bwd, get_raw=True)
    def _bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)
