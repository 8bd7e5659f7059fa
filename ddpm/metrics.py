"""Scores for generated images, computed with the offline judge (``ddpm/judge.py``).

Three questions, three numbers:
  * class accuracy: does the judge recognise the class each image was asked to be?
  * Fréchet distance (FD): do the judge's features of the generated set look like those
    of real images, in mean and in spread? Lower is better; 0 means identical Gaussians.
  * diversity: how far apart are images of the same class, in feature space? A drop
    compared with real images is the signature of mode collapse.
And one count on the pixels themselves: ``speckle``, isolated pixels per image, which a
feature-space number can miss.

FD is biased upwards for small sets, so it only means something next to the FD of *real*
images at the same size: ``real_floor`` gives that floor. All features are float64 here,
because the matrix square root in FD loses digits in float32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import load_fashion_mnist
from .frechet import frechet_distance
from .judge import Judge

NUM_CLASSES = 10
BATCH = 1000  # images per judge forward pass: bounded memory, still fast


def class_accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor,
                   num_classes: int = NUM_CLASSES) -> tuple[float, list[float]]:
    """Fraction of images classified as their label, overall and per class.

    logits_or_pred: float N x C logits, or int N predicted classes.
    labels: int N, the classes the images should be, in 0..num_classes-1.
    Returns (overall in [0, 1], per_class: num_classes floats in [0, 1]; NaN for a class
    with no images).
    """
    pred = logits_or_pred.argmax(dim=1) if logits_or_pred.ndim == 2 else logits_or_pred
    pred, labels = pred.cpu(), labels.cpu()
    correct = (pred == labels).double()
    per_class = [correct[labels == c].mean().item() if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    return correct.mean().item(), per_class


def diversity(feats: torch.Tensor, labels: torch.Tensor,
              num_classes: int = NUM_CLASSES) -> tuple[float, list[float]]:
    """Mean pairwise Euclidean distance between features of images of the same class.

    feats: float N x D; labels: int N in 0..num_classes-1.
    Returns (mean over the classes that have >= 2 images, per_class: num_classes floats,
    NaN for a class with fewer than 2 images). Memory grows with the square of the
    largest class size (fine up to a few thousand images per class).
    """
    feats, labels = feats.double().cpu(), labels.cpu()
    per_class = []
    for c in range(num_classes):
        members = feats[labels == c]
        per_class.append(torch.pdist(members).mean().item() if len(members) >= 2 else float("nan"))
    return torch.tensor(per_class).nanmean().item(), per_class


def speckle(images_u8: torch.Tensor, dark: int = 32, bright: int = 96) -> float:
    """Isolated pixels per image (uint8 N x 28 x 28): salt, a lit pixel (> ``dark``) none of whose
    4 neighbours is lit, and pepper, a dark pixel all of whose 4 neighbours are bright
    (> ``bright``). Real Fashion-MNIST test images have 0.23 per image; samples whose clean-sample
    estimate overshot the pixel range during sampling have ten times as many."""
    x = images_u8.float()
    p = F.pad(x, (1, 1, 1, 1), value=0.0)
    neighbours = torch.stack([p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]])
    salt = (x > dark) & (neighbours.max(0).values <= dark)
    pepper = (x <= dark) & (neighbours.min(0).values > bright)
    return (salt | pepper).flatten(1).sum(1).float().mean().item()


@torch.inference_mode()
def embed(judge: Judge, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the judge over a uint8 N x 28 x 28 image set, ``BATCH`` images at a time.

    Returns (features: float64 N x D, logits: float32 N x 10), both on the CPU.
    """
    device = next(judge.parameters()).device
    feats, logits = [], []
    for start in range(0, len(images_u8), BATCH):
        f, l = judge.features_and_logits(images_u8[start : start + BATCH].to(device))
        feats.append(f.double().cpu())
        logits.append(l.cpu())
    return torch.cat(feats), torch.cat(logits)


@dataclass(frozen=True)
class Reference:
    """Judge features of a real image set, to compare generated sets against.

    features: float64 N x D; labels: int64 N. ``diversity`` and ``per_class_diversity``
    are the real images' own diversity: the value a generator should come close to.
    """

    split: str
    features: torch.Tensor
    labels: torch.Tensor
    diversity: float
    per_class_diversity: list[float]
    speckle: float


def reference_stats(judge: Judge, split: str = "test", root: str | None = None) -> Reference:
    """Judge features of a real Fashion-MNIST split; computed once per (judge, split, root).

    The cache holds on to ``judge``; features depend on its weights, so do not change
    them in place after calling this.
    """
    return _reference_stats(judge, split, root)  # one cache key however the defaults are passed


@functools.lru_cache(maxsize=4)
def _reference_stats(judge: Judge, split: str, root: str | None) -> Reference:
    real = load_fashion_mnist(split, root=root)
    feats, _ = embed(judge, real.images)
    div, per_class_div = diversity(feats, real.labels)
    return Reference(split, feats, real.labels, div, per_class_div, speckle(real.images))


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0,
                    num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Indices (int64 n) of a seeded random subset with n // num_classes images per class,
    the first n % num_classes classes getting one more."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        take = n // num_classes + (c < n % num_classes)
        if take > len(members):
            raise ValueError(f"class {c} has {len(members)} images, cannot take {take}")
        picks.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(picks)


def floor_images(n: int, root: str | None = None) -> torch.Tensor:
    """uint8 n x 28 x 28: the real *training* images (fixed, seeded, class-balanced) of ``real_floor``."""
    train = load_fashion_mnist("train", root=root)
    return train.images[balanced_subset(train.labels, n)]


@functools.lru_cache(maxsize=16)
def real_floor(judge: Judge, n: int, root: str | None = None) -> float:
    """FD between n real training images (``floor_images``) and the test set.

    That is the FD a perfect generator would get with n samples: print it beside every FD.
    """
    feats, _ = embed(judge, floor_images(n, root))
    return frechet_distance(feats, reference_stats(judge, "test", root).features)


def judge_report(images_u8: torch.Tensor, labels: torch.Tensor, judge: Judge,
                 reference: Reference) -> dict:
    """Score generated images against a real reference set (from ``reference_stats``).

    images_u8: uint8 N x 28 x 28 in [0, 255], what the sampler saves.
    labels: int64 N, the classes the images were asked to be.
    Returns {"accuracy": float, "per_class_accuracy": 10 floats, "fd": float,
    "diversity": float, "per_class_diversity": 10 floats, "speckle": float, "n": N}.
    """
    feats, logits = embed(judge, images_u8)
    accuracy, per_class_accuracy = class_accuracy(logits, labels)
    div, per_class_div = diversity(feats, labels)
    return {
        "accuracy": accuracy,
        "per_class_accuracy": per_class_accuracy,
        "fd": frechet_distance(feats, reference.features),
        "diversity": div,
        "per_class_diversity": per_class_div,
        "speckle": speckle(images_u8),
        "n": len(labels),
    }


def psnr(images: torch.Tensor, reference: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 N x H x W (or N x 3 x H x W) ``images`` against ``reference`` on a 0..1 scale
    (torchmetrics'); with ``known`` (bool N x H x W), over those pixels alone (inpainting's known region,
    which torchmetrics cannot mask). float N."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = images.float() / 255, reference.float() / 255
    if known is None:  # over each image's pixels (and colour channels)
        return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=tuple(range(1, a.dim())))
    mse = (a - b).pow(2).mul(known).sum((1, 2)) / known.sum((1, 2)).clamp_min(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of uint8 N x H x W ``images`` against ``reference`` (torchmetrics', 0..1 scale)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images[:, None].float() / 255, reference[:, None].float() / 255,
                                               data_range=1.0).item()
