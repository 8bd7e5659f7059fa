"""Attributes measured from the pixels, so that captions can say more than the class.

    python -m conditioning.text.attributes --figure attributes.png   # examples of every bin, per class
    python -m conditioning.text.attributes --autoencoder runs/autoencoder_fashion_quick   # bins kept through it

Three measurements of a uint8 28 x 28 image, on its *garment*: the pixels brighter than
``GARMENT_LEVEL`` (Fashion-MNIST's background is black):
  * **brightness**: the garment's mean pixel value, 0..255;
  * **size**: the garment's share of the 784 pixels;
  * **texture**: high-frequency energy inside the garment: the mean absolute difference between
    each interior pixel (all four neighbours on the garment too) and the mean of its 3 x 3
    neighbourhood, divided by the garment's brightness (so a dark garment is not "plain" only
    because its differences are small).
Each is split in two at the median *of its class* over the training set (``AttributeBins``), so
every bin holds half of every class and an attribute says nothing about the class: "dark" is
half of all coats and half of all sandals. The words, low bin first, are ``ATTRIBUTES``.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from ddpm.data import CLASS_NAMES, HUB_NAME, load_fashion_mnist

ATTRIBUTES = {"brightness": ("dark", "light"), "size": ("small", "large"), "texture": ("plain", "patterned")}
ATTRIBUTE_WORDS = {word for words in ATTRIBUTES.values() for word in words}
GARMENT_LEVEL = 16  # a pixel above this is on the garment


def garment_mask(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 -> bool N x 28 x 28: the pixels of the garment."""
    return images > GARMENT_LEVEL


def measure(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float N x 3: brightness, size, texture (the order of ``ATTRIBUTES``).
    An image with no garment pixel measures 0 on all three."""
    x = images.float()
    mask = garment_mask(images)
    area = mask.sum((1, 2)).float()
    brightness = (x * mask).sum((1, 2)) / area.clamp(min=1)
    size = area / mask[0].numel()
    m = mask.float()[:, None]
    interior = (F.conv2d(m, torch.ones(1, 1, 3, 3), padding=1)[:, 0] == 9) & mask  # the 3 x 3 is all garment
    local_mean = F.avg_pool2d(x[:, None], 3, stride=1, padding=1)[:, 0]
    detail = ((x - local_mean).abs() * interior).sum((1, 2)) / interior.sum((1, 2)).clamp(min=1)
    texture = detail / brightness.clamp(min=1)
    return torch.stack([brightness, size, texture], dim=1)


class AttributeBins:
    """The per-class medians that split each attribute in two: ``thresholds`` float C x 3."""

    def __init__(self, thresholds: torch.Tensor):
        self.thresholds = thresholds

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, n_classes: int = 10) -> "AttributeBins":
        """The medians of each class's measurements (uint8 N x 28 x 28, int64 N)."""
        values = measure(images)
        return cls(torch.stack([values[labels == c].median(0).values for c in range(n_classes)]))

    def bins(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """int64 N x 3: 0 (the first word of ``ATTRIBUTES``) or 1 (the second), judged against the
        medians of each image's class (the class asked for, for generated images)."""
        return (measure(images) > self.thresholds[labels]).long()


@functools.lru_cache(maxsize=4)
def training_bins(root: str | None = None, hub_name: str | None = HUB_NAME) -> AttributeBins:
    """``AttributeBins`` fitted on the whole Fashion-MNIST training set (computed once per process)."""
    train = load_fashion_mnist("train", root=root, hub_name=hub_name)
    return AttributeBins.fit(train.images, train.labels)


def bins_for(data) -> AttributeBins:
    """``training_bins`` of the training set a stage's ``data`` section (``DataConfig``) names."""
    return training_bins(data.root, data.hub_name)


def bin_examples(images: torch.Tensor, labels: torch.Tensor, bins: torch.Tensor, attribute: int, per_bin: int = 4
                 ) -> torch.Tensor:
    """For one attribute, each class's first ``per_bin`` images of its low bin then its high bin:
    uint8 C x 2*per_bin x 28 x 28, the grid of ``--figure``."""
    rows = []
    for c in range(int(labels.max()) + 1):
        row = [images[(labels == c) & (bins[:, attribute] == b)][:per_bin] for b in (0, 1)]
        rows.append(torch.cat(row))
    return torch.stack(rows)


@torch.no_grad()
def round_trip(autoencoder_run: str, images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 through an autoencoder run and back (what a latent model can at best make)."""
    from ddpm.run_folder import load_trained
    from latent.autoencoder import AutoencoderStage

    stage, model, _ = load_trained(AutoencoderStage, autoencoder_run)
    space = stage.latent_space(model)
    return torch.cat([space.reconstruct(chunk).cpu() for chunk in images.split(500)])


def main(argv: list[str] | None = None) -> int:
    from ddpm.errors import cli_errors
    from ddpm.plots import save_grid

    @cli_errors
    def run() -> None:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--figure", default="attributes.png", help="PNG: one grid per attribute, side by side")
        parser.add_argument("--autoencoder", default=None, metavar="RUN",
                            help="also: how many test images keep their bins through this autoencoder run "
                                 "(the ceiling of adherence for latent diffusion on it)")
        args = parser.parse_args(argv)
        fitted = training_bins()
        test = load_fashion_mnist("test")
        bins = fitted.bins(test.images, test.labels)
        print("per-class medians (training set), and the test images' share in the high bin:")
        for name, column in zip(ATTRIBUTES, range(3)):
            shares = [bins[test.labels == c, column].float().mean().item() for c in range(len(CLASS_NAMES))]
            print(f"  {name:10s} " + " ".join(f"{t:7.3f}" for t in fitted.thresholds[:, column].tolist())
                  + "   high bin: " + " ".join(f"{s:.2f}" for s in shares))
        if args.autoencoder:
            kept = (fitted.bins(round_trip(args.autoencoder, test.images), test.labels) == bins).float().mean(0)
            print(f"through {args.autoencoder}: the share of the {len(bins)} test images that keep their bin: "
                  + ", ".join(f"{name} {k:.3f}" for name, k in zip(ATTRIBUTES, kept.tolist())))
        for column, (name, words) in enumerate(ATTRIBUTES.items()):
            out = args.figure.replace(".png", f"_{name}.png")
            grid = bin_examples(test.images, test.labels, bins, column)
            save_grid(grid, out, list(CLASS_NAMES), title=f"{name}: 4 '{words[0]}' | 4 '{words[1]}' (test images)")
            print(f"wrote {out}")

    return run()


if __name__ == "__main__":
    sys.exit(main())
