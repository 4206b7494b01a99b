"""What a run writes besides checkpoints: metrics.jsonl, sample grids and the reward curve."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def image_grid(samples: torch.Tensor, columns: int | None = None) -> Image.Image:
    """Tile (B, 3, H, W) images in [0, 1] into one picture; videos (B, F, 3, H, W) show frame 0..F
    of each sample on a row (a contact sheet)."""
    if samples.ndim == 5:
        b, f = samples.shape[:2]
        samples = samples.reshape(b * f, *samples.shape[2:])
        columns = f
    n, _, h, w = samples.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    pixels = (samples.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    return Image.fromarray(canvas)


def save_grid(samples: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """Write :func:`image_grid` as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(samples, columns).save(path)
    return path


class MetricsLog:
    """``metrics.jsonl``: one JSON object per iteration, flushed as it is written.

    On resume the file is truncated to the checkpoint's iteration so that the log of a resumed
    run is the same as that of an uninterrupted one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, iteration: int) -> None:
        """Keep only records with ``iteration < iteration`` (the next one to run)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a killed process
                continue
            if record["iteration"] < iteration:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)  # a kill while truncating loses nothing

    def append(self, record: dict[str, Any]) -> None:
        """Append one record."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_reward_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Plot mean reward (with +/- one std band) and every per-reward mean against the iteration."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(its, mean, label="reward (weighted sum)", color="C0")
    ax.fill_between(its, mean - std, mean + std, alpha=0.2, color="C0")
    per_reward = sorted({k for r in records for k in r if k.startswith("reward/")})
    if len(per_reward) > 1:
        for i, key in enumerate(per_reward, start=1):
            ax.plot(its, [r.get(key, math.nan) for r in records], label=key, color=f"C{i}", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def reward_summary(records: list[dict[str, Any]]) -> str | None:
    """One line comparing the first iteration's reward with the mean of the last 10% of iterations,
    in units of the first iteration's standard deviation."""
    if len(records) < 2:
        return None
    first = records[0]
    tail = records[-max(1, len(records) // 10) :]
    tail_mean = sum(r["reward_mean"] for r in tail) / len(tail)
    std = first["reward_std"]
    gain = (tail_mean - first["reward_mean"]) / std if std > 0 else math.inf
    seconds = sum(r["seconds"] for r in records)
    return (
        f"reward: iteration 0 mean {first['reward_mean']:.4f} (std {std:.4f}); last {len(tail)} iterations mean "
        f"{tail_mean:.4f} = {gain:+.1f} initial std; {len(records)} iterations in {seconds:.0f} s"
    )
