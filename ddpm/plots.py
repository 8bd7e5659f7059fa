"""Figures: sample grids with class names or prompts and training curves, as PNG files
for runs and shown inline in the notebooks (the same layout both ways)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def grid_figure(images: torch.Tensor, row_titles: list[str] | None = None, title: str = "",
                col_titles: list[str] | None = None, size: float = 1.1, wrap: int = 14):
    """A matplotlib figure of uint8 images laid out R x C x H x W (or C x H x W for one row),
    grayscale, or R x C x 3 x H x W in colour. Row r is labelled ``row_titles[r]`` (a class name, a prompt),
    column titles are wrapped at ``wrap`` characters, the title at the figure's width."""
    images = images[None] if images.ndim == 3 else images
    if images.ndim == 5:  # colour: matplotlib wants H x W x 3
        images = images.permute(0, 1, 3, 4, 2)
    rows, cols = images.shape[:2]
    width, height = size * cols + 1.6, size * rows + 0.5  # inches
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].cpu().numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        if row_titles:
            axes[r][0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=9)
    for c, name in enumerate(col_titles or []):
        axes[0][c].set_title(textwrap.fill(name, wrap), fontsize=9)
    top = 1.0
    if title:  # wrapped to the figure's width, in a band of its own above the images
        lines = textwrap.wrap(title, max(20, int(width * 11)))
        fig.suptitle("\n".join(lines), fontsize=10)
        top = 1 - (0.15 + 0.18 * len(lines)) / height
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def save_grid(images: torch.Tensor, path: str | Path, row_titles: list[str], title: str = "",
              col_titles: list[str] | None = None) -> Path:
    """Save ``grid_figure`` of the images as a PNG; returns ``path``."""
    fig = grid_figure(images, row_titles, title, col_titles)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def show_grid(images: torch.Tensor, row_titles: list[str] | None = None, col_titles: list[str] | None = None,
              title: str = "", size: float = 1.0, wrap: int = 14) -> None:
    """Show ``grid_figure`` of the images in a notebook."""
    grid_figure(images, row_titles, title, col_titles, size, wrap)
    plt.show()


def rows_of(images: torch.Tensor, row_names: list[str], n: int, columns: int = 8):
    """N x H x W or N x 3 x H x W (n per row name, in order) -> (R x C x ... with rows of at most ``columns``,
    as even as they can be (10 -> 5 + 5, not 8 + 2), the row titles: each name on the first of its rows)."""
    rows_per_name = math.ceil(n / columns)
    cols = math.ceil(n / rows_per_name)
    grid = torch.zeros(len(row_names) * rows_per_name, cols, *images.shape[1:], dtype=images.dtype)
    titles = []
    for i, name in enumerate(row_names):
        block = images[i * n : (i + 1) * n]
        for r in range(rows_per_name):
            row = block[r * cols : (r + 1) * cols]
            grid[i * rows_per_name + r, : len(row)] = row
            titles.append(name if r == 0 else "")
    return grid, titles


def tile(grid: torch.Tensor, scale: int = 4, gap: int = 2, gap_value: int = 96) -> np.ndarray:
    """R x C x h x w uint8 images (R x C x 3 x h x w in colour) -> one uint8 image (R rows, C columns;
    H x W, or H x W x 3) for a web page: each image enlarged ``scale`` times (nearest pixel, so no pixel is
    invented) and framed by ``gap`` pixels of grey."""
    if grid.ndim == 5:  # colour: channels last, as an image array has them
        grid = grid.permute(0, 1, 3, 4, 2)
    rows, cols, h, w = grid.shape[:4]
    cell_h, cell_w = h * scale + gap, w * scale + gap
    out = np.full((rows * cell_h + gap, cols * cell_w + gap, *grid.shape[4:]), gap_value, dtype=np.uint8)
    big = grid.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3).numpy()
    for r in range(rows):
        for c in range(cols):
            top, left = gap + r * cell_h, gap + c * cell_w
            out[top : top + h * scale, left : left + w * scale] = big[r, c]
    return out


def show_losses(run_dir: str | Path, title: str) -> None:
    """The training loss of a run against the optimizer step, in a notebook."""
    records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    plt.figure(figsize=(5, 2.6))
    plt.plot([r["step"] for r in records], [r["loss"] for r in records], ".-")
    plt.yscale("log")
    plt.xlabel("optimizer step")
    plt.ylabel("loss")
    plt.title(title)
    plt.grid(alpha=0.3)
    plt.show()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_minutes(run_dir: str | Path) -> float:
    """The minutes a run has trained, from the last ``elapsed_s`` of its metrics.jsonl (0 before any)."""
    return max((r.get("elapsed_s", 0) for r in read_metrics(Path(run_dir) / "metrics.jsonl")), default=0) / 60


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
    series = {k: v for k, v in series.items() if k not in ("epoch", "images_per_s", "elapsed_s") and len(v) > 1}
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, (key, points) in zip(axes[:, 0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "loss" or key.endswith("_loss"):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
