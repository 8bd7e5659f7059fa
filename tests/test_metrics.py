"""Metrics: checked against closed forms and hand-made examples, then on real images."""

import math

import pytest
import torch

from ddpm.data import load_fashion_mnist
from ddpm.errors import UserError
from ddpm.judge import load_judge
from ddpm.metrics import (balanced_subset, class_accuracy, diversity, frechet_distance,
                          judge_report, reference_stats, speckle)


def gaussian(n, mean, std, seed):
    """n x D samples whose sample mean and std are exactly ``mean`` and ``std`` (D-dim)."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_fd_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    mean_a, std_a = [0.0, 1.0, -2.0], [1.0, 2.0, 0.5]
    mean_b, std_b = [1.0, 1.0, 0.0], [3.0, 2.0, 1.5]
    a = gaussian(20_000, mean_a, std_a, seed=1)
    b = gaussian(20_000, mean_b, std_b, seed=2)
    # Sample covariances are only nearly diagonal, so allow a little slack.
    expected = sum((ma - mb) ** 2 + (sa - sb) ** 2 for ma, mb, sa, sb in zip(mean_a, mean_b, std_a, std_b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


def test_fd_matches_closed_form_in_one_dimension():
    a = gaussian(1000, [2.0], [1.0], seed=3)
    b = gaussian(1000, [-1.0], [4.0], seed=4)
    assert frechet_distance(a, b) == pytest.approx(3.0**2 + (1.0 - 4.0) ** 2, rel=1e-9)


def test_fd_agrees_with_the_textbook_formula_for_correlated_features():
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(300, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(400, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 5, generator=generator, dtype=torch.float64) + 1
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(S_a S_b) = sum of square roots of the (real, >= 0) eigenvalues of S_a S_b
    trace_cross = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_cross
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)


def test_fd_grows_with_shift():
    feats = torch.randn(1000, 8, generator=torch.Generator().manual_seed(5))
    distances = [frechet_distance(feats, feats + shift) for shift in (0.1, 0.5, 2.0)]
    assert distances == sorted(distances)
    assert distances[-1] == pytest.approx(8 * 2.0**2, rel=1e-6)


def test_class_accuracy_on_hand_made_example():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    overall, per_class = class_accuracy(pred, labels, num_classes=4)
    assert overall == pytest.approx(4 / 6)
    assert per_class[:3] == pytest.approx([0.5, 2 / 3, 1.0])
    assert math.isnan(per_class[3])  # no images of class 3
    logits = torch.nn.functional.one_hot(pred, 4).float()
    assert class_accuracy(logits, labels, num_classes=4)[0] == pytest.approx(4 / 6)


def test_diversity_is_zero_for_copies_and_positive_otherwise():
    labels = torch.tensor([0, 0, 0, 1, 1])
    copies = torch.ones(5, 4)
    mean, per_class = diversity(copies, labels, num_classes=2)
    assert mean == 0.0 and per_class == [0.0, 0.0]

    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    mean, per_class = diversity(feats, labels, num_classes=3)
    # class 0: pairwise distances 5, 0, 5; class 1: identical; class 2: empty
    assert per_class[:2] == pytest.approx([10 / 3, 0.0])
    assert math.isnan(per_class[2])
    assert mean == pytest.approx(5 / 3)


def test_balanced_subset_is_balanced_and_seeded():
    labels = torch.arange(10).repeat(50)
    picks = balanced_subset(labels, 25)
    assert torch.bincount(labels[picks], minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.equal(picks, balanced_subset(labels, 25))


@pytest.fixture(scope="module")
def judge_and_reference():
    try:
        load_fashion_mnist("test", hub_name=None)
    except UserError as e:
        pytest.skip(f"Fashion-MNIST is not installed locally: {e}")
    judge = load_judge()
    return judge, reference_stats(judge, "test")


def test_judge_report_tells_real_images_from_noise(judge_and_reference):
    judge, reference = judge_and_reference
    real = load_fashion_mnist("test", hub_name=None)
    picks = balanced_subset(real.labels, 500)
    images, labels = real.images[picks], real.labels[picks]
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    good = judge_report(images, labels, judge, reference)
    bad = judge_report(noise, labels, judge, reference)
    assert set(good) == {"accuracy", "per_class_accuracy", "fd", "diversity", "per_class_diversity", "speckle", "n"}
    assert good["n"] == 500 and len(good["per_class_accuracy"]) == len(good["per_class_diversity"]) == 10
    assert good["accuracy"] > 0.9 and bad["accuracy"] < 0.3
    assert good["fd"] * 10 < bad["fd"]
    assert good["diversity"] == pytest.approx(reference.diversity, rel=0.2)
    assert good["speckle"] < 0.5 < 10 < bad["speckle"]


def test_reference_features_are_computed_once_however_they_are_asked_for(judge_and_reference):
    judge, reference = judge_and_reference
    assert reference_stats(judge) is reference is reference_stats(judge, "test", None)


def test_speckle_counts_isolated_pixels(fashion_mnist):
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 5:20, 5:20] = 200  # a garment
    assert speckle(image) == 0
    image[0, 2, 25] = 90  # salt: a lit pixel on black
    image[0, 10, 10] = 0  # pepper: a dark pixel on the garment
    image[0, 25, 3:5] = 90  # two lit pixels side by side: a (thin) shape, not salt
    assert speckle(image) == 2
    real = speckle(fashion_mnist.images[:2000])
    assert 0 < real < 0.5  # real garments: a pixel in every few images
    noisy = fashion_mnist.images[:2000].clone()
    dots = torch.rand(noisy.shape, generator=torch.Generator().manual_seed(0)) < 0.01
    noisy[dots & (noisy == 0)] = 128
    assert speckle(noisy) > real + 3
