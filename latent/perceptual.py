"""A perceptual distance that needs no download: the features of a frozen CNN with random weights.

Stable Diffusion's autoencoder adds LPIPS to its L1 loss: the distance between two images in
the feature maps of a pretrained VGG, each feature vector first scaled to unit length. LPIPS
downloads VGG's weights when it runs. A deep CNN whose weights are drawn at random, and never
trained, already measures structure that a per-pixel loss does not: each feature sums a 3 x 3
neighbourhood of the layer below, so features deep in the net compare edges, stripes and
textures over patches of 7, 15, 31 pixels (Liu et al. 2021, "Generic perceptual loss"). Its
weights come from a fixed seed, so every process and every resumed run builds the same
network; nothing is learnt, nothing is saved, and it never sees the judge.

    d(x, y) = sum over layers l of  mean over positions  | f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)| |^2

x, y: B x C x H x W in [-1, 1]; d: one number, the mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RandomFeatureDistance(nn.Module):
    """LPIPS's distance in the feature maps of a frozen random CNN: per level, two 3 x 3
    convolutions with ReLU, the second with stride 2 (``widths`` channels per level)."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.levels = nn.ModuleList()
        for width in widths:
            level = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
            for conv in (level[0], level[2]):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(conv.bias)
            self.levels.append(level)
            in_channels = width
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        distance = x.new_zeros(())
        for level in self.levels:
            x, y = level(x), level(y)
            distance = distance + (F.normalize(x, dim=1) - F.normalize(y, dim=1)).pow(2).sum(1).mean()
        return distance
