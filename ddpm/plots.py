"""PNG figures: sample grids with class names, and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def save_grid(images: torch.Tensor, path: str | Path, row_titles: list[str], title: str = "",
              col_titles: list[str] | None = None) -> Path:
    """Save uint8 images (R x C x H x W grayscale, or R x C x H x W x 3) as a titled PNG grid.

    Row r is labelled ``row_titles[r]`` (e.g. a class name or a prompt).
    """
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 1.6, 1.1 * rows + 0.5), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].cpu().numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=9)
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_metrics(path: str | Path, record: dict) -> None:
    """Add one JSON record as a line of a metrics.jsonl file."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path: str | Path, out: str | Path) -> Path | None:
    """Plot every numeric series in a metrics.jsonl file against ``step``, one panel each."""
    records = read_metrics(metrics_path)
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((rec["step"], value))
    series = {k: v for k, v in series.items() if k not in ("epoch", "images_per_s") and len(v) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, (key, points) in zip(axes[:, 0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
