"""The Fréchet distance between two sets of feature vectors: the FD of ``ddpm/metrics.py`` and of the
judge's real-vs-real floor (``ddpm/judge.py``). Float64 throughout: the matrix square root loses digits
in float32."""

from __future__ import annotations

import torch


def _mean_and_cov(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N x D features -> (mean D, unbiased covariance D x D), in float64."""
    if len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a Gaussian, got {len(feats)}")
    feats = feats.double()
    mean = feats.mean(dim=0)
    centered = feats - mean
    return mean, centered.T @ centered / (len(feats) - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite D x D matrix, via eigh.

    Rounding can make tiny eigenvalues slightly negative; they are clamped to 0.
    """
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    feats_a: N_a x D, feats_b: N_b x D, any float dtype; N_a, N_b >= 2.
    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a^1/2 S_b S_a^1/2).
    (The last term equals the usual tr sqrt(S_a S_b), but its matrix is symmetric, so
    ``eigh`` can take the root.) Returns a float >= 0, in squared feature units.
    """
    mu_a, cov_a = _mean_and_cov(feats_a)
    mu_b, cov_b = _mean_and_cov(feats_b)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric in exact arithmetic; make it so in floats
    trace_cross = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_cross
    return max(fd.item(), 0.0)  # identical sets can land a hair below 0 through rounding
