"""How good are the samples? Offline numbers from the judge (``ddpm/judge.py``).

    python sample.py RUN --evaluate [--n 1000] [--guidance 3]      one setting
    python sample.py RUN --sweep 0 1 2 3 5 8 [--n 1000]            a guidance sweep

A balanced set of n samples (n/10 per class) is scored for
  accuracy   the share the judge classifies as the class that was asked for;
  FD         Fréchet distance to the real test set in the judge's feature space, printed
             beside the floor: the FD of n *real* training images (FD grows as n shrinks);
  diversity  mean feature distance between samples of a class, beside the real value;
  speckle    isolated pixels per image (salt on the black background, pepper on a garment),
             beside the real value (``metrics.speckle``).
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import torch

from .errors import UserError
from .judge import Judge, load_judge
from .metrics import judge_report, real_floor, reference_stats
from .plots import save_grid


@functools.lru_cache(maxsize=2)
def cached_judge(device: str = "cpu") -> Judge:
    return load_judge(device=device)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """int64 n: 0, 0, ..., 1, 1, ... with n // num_classes (or one more) of each class."""
    return torch.arange(n) % num_classes


def evaluate_model(stage, model, n: int = 1000, *, guidance: float | None = None, scheduler: str | None = None,
                   steps: int | None = None, seed: int = 0, phrasings: str = "train", progress: bool = False,
                   clip=None) -> dict:
    """Sample n images with the given settings (default: the run's ``sample`` config) and score them.
    ``phrasings``: a text run's prompts for each class, "train" or "unseen" (see ``generate``).
    ``clip``: a ``conditioning.clip.scorer.ClipScorer``, to add the CLIP score of the images against
    their class prompts."""
    data = getattr(stage.config, "data", None)
    if data is not None and data.source != "fashion_mnist":
        raise UserError("the judge's evaluation (accuracy, FD, diversity) knows Fashion-MNIST only so far; for your "
                        "own images, train a judge and read its accuracy and FD floor: python -m ddpm.judge "
                        "--config CONFIG --out JUDGE.safetensors")
    s = stage.config.sample
    settings = stage.sampling_settings(guidance=guidance, scheduler=scheduler, steps=steps, seed=seed)
    labels = balanced_labels(n, len(stage.class_names)).sort().values
    images = stage.generate(model, labels, phrasings=phrasings, progress=progress, **settings)
    judge = cached_judge()
    reference = reference_stats(judge)
    report = judge_report(images, labels, judge, reference)
    if clip is not None:
        report["clip_score"] = clip.score_labels(images, labels, phrasings)
    return {**settings, "guidance_interval": s.guidance_interval, "clip_denoised": s.clip_denoised, **report,
            "fd_floor": real_floor(judge, n), "real_diversity": reference.diversity, "real_speckle": reference.speckle}


def as_metrics(report: dict) -> dict:
    """The flat numbers of a report, named for metrics.jsonl and the trackers."""
    keys = ("accuracy", "fd", "fd_floor", "diversity", "speckle", "clip_score", "n", "guidance")
    return {f"eval_{k}": report[k] for k in keys if k in report}


def format_table(reports: list[dict]) -> str:
    lines = [f"{'guidance':>8} {'accuracy':>9} {'FD':>8} {'floor':>7} {'diversity':>10} {'real':>6} "
             f"{'speckle':>8} {'real':>5} {'n':>6}  sampler"]
    for r in reports:
        lines.append(f"{r['guidance']:>8g} {r['accuracy']:>9.3f} {r['fd']:>8.3f} {r['fd_floor']:>7.3f} "
                     f"{r['diversity']:>10.3f} {r['real_diversity']:>6.3f} {r['speckle']:>8.2f} "
                     f"{r['real_speckle']:>5.2f} {r['n']:>6}  {r['scheduler']}-{r['steps']}"
                     + (f"  CLIP score {r['clip_score']:.2f}" if "clip_score" in r else ""))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of strings, one list per row."""
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def format_per_class(report: dict, class_names) -> str:
    return "\n".join(f"  {name:<12} accuracy {acc:.3f}   diversity {div:.3f}" for name, acc, div in
                     zip(class_names, report["per_class_accuracy"], report["per_class_diversity"]))


def plot_per_class(report: dict, class_names, path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(class_names)), report["per_class_accuracy"], color="tab:blue")
    ax.axhline(report["accuracy"], color="k", ls="--", lw=1, label=f"overall {report['accuracy']:.3f}")
    ax.set_xticks(range(len(class_names)), class_names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judge accuracy")
    ax.set_title(f"guidance {report['guidance']:g}, {report['scheduler']}-{report['steps']}, n = {report['n']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(reports: list[dict], path) -> None:
    """Accuracy, FD and diversity against the guidance scale: the fidelity/diversity trade-off."""
    w = [r["guidance"] for r in reports]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(w, [r["accuracy"] for r in reports], "o-")
    axes[0].set_ylabel("accuracy")
    axes[1].plot(w, [r["fd"] for r in reports], "o-", label="samples")
    axes[1].axhline(reports[0]["fd_floor"], color="k", ls="--", lw=1, label="real floor")
    axes[1].set_ylabel("FD (judge features)")
    axes[1].legend()
    axes[2].plot(w, [r["diversity"] for r in reports], "o-", label="samples")
    axes[2].axhline(reports[0]["real_diversity"], color="k", ls="--", lw=1, label="real")
    axes[2].set_ylabel("diversity")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("guidance scale w")
        ax.grid(alpha=0.3)
    fig.suptitle(f"n = {reports[0]['n']} per scale, {reports[0]['scheduler']}-{reports[0]['steps']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_grid(stage, model, scales: list[float], path, seed: int = 0, **settings) -> None:
    """One row per guidance scale, one column per class, the same starting noise in every row.
    ``settings``: those of ``stage.generate`` (scheduler, steps, phrasings)."""
    labels = torch.arange(len(stage.class_names))
    rows = [stage.generate(model, labels, guidance=w, seed=seed, **settings) for w in scales]
    save_grid(torch.stack(rows), path, [f"w = {w:g}" for w in scales], title="same seeds, rising guidance",
              col_titles=[name[:10] for name in stage.class_names])


def best_of_groups(scores: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest of each consecutive ``group`` of ``scores`` (float N),
    best first: int64 (N / group) * keep."""
    best = scores.view(-1, group).topk(keep, dim=1).indices
    return (best + group * torch.arange(len(scores) // group)[:, None]).flatten()
