"""The run directory's logs: `metrics.csv` (one row per step, flushed as written) and `loss.png`."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping


class MetricsLog:
    """Appends one CSV row per step; on resume, drops rows at or after the resumed step (they are replayed)."""

    def __init__(self, path: str | Path, fields: list[str], resume_step: int | None = None):
        self.path = Path(path)
        self.fields = fields
        kept = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) < resume_step]
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="raise")
        self._writer.writeheader()
        for row in kept:
            self._writer.writerow({k: row.get(k, "") for k in fields})
        self._file.flush()

    def write(self, row: Mapping) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def plot_loss(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Loss per step (and its running mean) with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_csv) if r["loss"] and math.isfinite(float(r["loss"]))]
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    half = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - half):i + half + 1]) / len(loss[max(0, i - half):i + half + 1])
              for i in range(len(loss))]  # centred, so the curve does not lag
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"mean over {2 * half + 1} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("L1 loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange", lw=1, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
