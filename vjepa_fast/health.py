"""Learning-health monitor: detects partial collapse of the target encoder's features during pretraining.

A falling V-JEPA loss proves nothing by itself (docs/design.md, section 8): with too high a learning rate for the
batch or too low an EMA momentum, the features become predictable from the clip's global content, the loss drops
fast, and the features lose what tells one token of a clip from another. The monitor tracks that directly.

Spreads are measured on the regression target, layer_norm(features) without affine (as the loss uses it), so each
token has zero mean and unit variance over its dims and the spreads are scale-free:
- token spread: for each clip and dim, the std over the clip's tokens; averaged over clips and dims.
  0 means every token of a clip carries the same vector.
- clip spread: for each dim, the std over the batch's clips of the clip's mean token; averaged over dims.
Per dim, within-clip variance + variance of the clip means + squared overall mean = the dim's mean square, which
averages to 1 over dims after the layer-norm: partial collapse moves weight from the first term to the second.
Measured on configs/demo.yaml (every 10 steps): the demo recipe kept its token spread at 0.37-0.39 through 200 steps;
lr 5e-4 with EMA 0.99 took it from 0.40 to 0.20 (and the clip spread from 0.28 to 0.42) by step 100.
"""
from __future__ import annotations

import logging
from collections import deque

import torch
import torch.nn.functional as F

from .model import TARGET_LN_EPS

log = logging.getLogger(__name__)

COLLAPSE_FRACTION = 0.7  # the demo's collapsing run crossed it at step 90 (0.6: step 100); the healthy one stayed >0.95

CAUSES = ("the learning rate is too high for the batch size (optimization.lr)",
          "the EMA momentum is too low (optimization.ema)",
          "the masks leave too few context tokens (mask.*.spatial_scale, mask.*.num_blocks)")


@torch.no_grad()
def spreads(features: torch.Tensor) -> torch.Tensor:
    """[token spread, clip spread] of features [B, N, D] (see the module docstring) as a device tensor, so the
    training step measures them without waiting for the device; N >= 2. The clip spread of a single clip (B = 1:
    a clip-length group of one clip) is NaN."""
    if features.dim() != 3 or features.size(0) < 1 or features.size(1) < 2:
        raise ValueError(f"features must be [B>=1, N>=2, D], got {list(features.shape)}")
    h = F.layer_norm(features.float(), (features.size(-1),), eps=TARGET_LN_EPS)
    clip = h.mean(dim=1).std(dim=0).mean() if features.size(0) > 1 else h.new_tensor(float("nan"))
    return torch.stack([h.std(dim=1).mean(), clip])


def feature_spread(features: torch.Tensor) -> tuple[float, float]:
    """(token spread, clip spread) of features [B, N, D] as floats."""
    token_spread, clip_spread = spreads(features).tolist()
    return token_spread, clip_spread


class HealthMonitor:
    """Every `every` steps (0: never), measures the target features' spreads; warns once when the token spread
    falls under `collapse_fraction` of its early value.

    The early value is the mean of the first `window` observations; the current value is the mean of the last
    `window` observations (one batch is noisy). state_dict() keeps both and whether the warning fired, so a
    resumed run compares against the same early value and does not warn twice.
    """

    def __init__(self, every: int, collapse_fraction: float = COLLAPSE_FRACTION, window: int = 3):
        if every < 0:
            raise ValueError(f"every must be >= 0 (0: off), got {every}")
        if not 0 < collapse_fraction < 1:
            raise ValueError(f"collapse_fraction must lie in (0, 1), got {collapse_fraction}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.every = every
        self.collapse_fraction = collapse_fraction
        self.window = window
        self.early: list[float] = []  # the first `window` token spreads
        self.recent: deque[float] = deque(maxlen=window)
        self.warned_at: int | None = None  # step of the warning, None until it fires

    def due(self, step: int) -> bool:
        """Whether `step` is a monitoring step (the loop needs the target features only then); never when every=0."""
        return self.every > 0 and step % self.every == 0

    @property
    def reference(self) -> float | None:
        """The early token spread, once `window` observations were made."""
        return sum(self.early) / len(self.early) if len(self.early) == self.window else None

    def observe(self, step: int, target_features: torch.Tensor) -> dict[str, float] | None:
        """The metrics to log at `step` (None when not a monitoring step) from the target encoder's output
        [B, N, D]; logs the collapse warning the first time the token spread falls under the threshold."""
        if not self.due(step):
            return None
        return self.record(step, *feature_spread(target_features))

    def record(self, step: int, token_spread: float, clip_spread: float) -> dict[str, float]:
        """observe() for spreads measured earlier (the training loop measures on the device with `spreads` and
        records at its next metric flush): the metrics to log, and the collapse warning when due."""
        if len(self.early) < self.window:
            self.early.append(token_spread)
        self.recent.append(token_spread)
        metrics = {"health_token_spread": token_spread, "health_clip_spread": clip_spread}
        reference = self.reference
        if reference is None:
            return metrics
        ratio = sum(self.recent) / len(self.recent) / reference
        metrics["health_token_spread_ratio"] = ratio
        if ratio < self.collapse_fraction and self.warned_at is None:
            self.warned_at = step
            log.warning("partial collapse at step %d: the target features' spread across tokens fell to %.0f%% of "
                        "its early value (%.3f -> %.3f; spread across clips now %.3f): the features are becoming "
                        "predictable from the clip's global content, and a falling loss no longer means learning. "
                        "Usual causes: %s.", step, 100 * ratio, reference, reference * ratio, clip_spread,
                        "; ".join(CAUSES))
        return metrics

    def state_dict(self) -> dict:
        return {"every": self.every, "collapse_fraction": self.collapse_fraction, "window": self.window,
                "early": list(self.early), "recent": list(self.recent), "warned_at": self.warned_at}

    def load_state_dict(self, state: dict) -> None:
        """Restore the early value, recent window and warning flag (the constructor's settings stay)."""
        self.early = list(state["early"])[:self.window]
        self.recent = deque(state["recent"], maxlen=self.window)
        self.warned_at = state["warned_at"]
