"""The shipped judge: accurate enough to score samples, and loaded safely."""

import importlib
import pickle
from pathlib import Path

import pytest
import torch

from ddpm.data import LabelledImages, load_fashion_mnist
from ddpm.errors import UserError
from ddpm.judge import FEATURE_DIM, Judge, accuracy, load_judge, random_flip, train_judge


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def test_set():
    try:
        return load_fashion_mnist("test", hub_name=None)
    except UserError as e:
        pytest.skip(f"Fashion-MNIST is not installed locally: {e}")


def test_shipped_judge_is_accurate_on_real_test_set(judge, test_set):
    assert accuracy(judge, test_set) >= 0.93


def test_features_and_logits_have_documented_shapes(judge):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        feats, logits = judge.features_and_logits(images)
        assert feats.shape == (5, FEATURE_DIM) and feats.dtype == torch.float32
        assert logits.shape == (5, 10)
        assert (feats >= 0).all()
        assert torch.equal(judge.features(images), feats)  # eval mode: deterministic
        assert torch.equal(judge(images), logits)


def test_judge_refuses_float_images(judge):
    with pytest.raises(ValueError, match="uint8"):
        judge(torch.rand(2, 28, 28))


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_disguised_as_weights_is_refused_not_unpickled(tmp_path):
    pickle.loads(pickle.dumps(_TouchOnUnpickle(tmp_path / "live")))
    assert (tmp_path / "live").exists(), "the payload should work when unpickled"

    weights = tmp_path / "judge.safetensors"
    weights.write_bytes(pickle.dumps(_TouchOnUnpickle(tmp_path / "pwned")))
    with pytest.raises(UserError, match="python -m ddpm.judge"):
        load_judge(weights)
    assert not (tmp_path / "pwned").exists()


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(UserError, match="not found.*python -m ddpm.judge"):
        load_judge(tmp_path / "nope.safetensors")


def test_random_flip_mirrors_some_images_and_keeps_the_rest():
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    out = random_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    flipped = [not torch.equal(a, b) for a, b in zip(out, images)]
    assert 0 < sum(flipped) < 64
    for before, after in zip(images, out):
        assert torch.equal(after, before) or torch.equal(after, before.flip(-1))


def test_training_is_reproducible():
    images = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tiny = LabelledImages(images, torch.arange(256) % 10)
    a, b = (train_judge(tiny, epochs=1, seed=3, batch_size=64) for _ in range(2))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_features_ignore_left_right_orientation():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    judge = Judge().eval()
    with torch.no_grad():
        assert torch.allclose(judge.features(images), judge.features(images.flip(-1)))


def test_untrained_judge_has_documented_shapes():
    feats = Judge().eval().features(torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert feats.shape == (3, FEATURE_DIM)


@pytest.mark.parametrize("command", ["ddpm.judge", "conditioning.finetune.subject"])
def test_tools_that_write_shipped_files_need_an_explicit_out(command, capsys):
    """``python -m ddpm.judge`` and ``python -m conditioning.finetune.subject`` write what the package ships
    (the judge's weights, the DreamBooth subject) only when told where."""
    main = importlib.import_module(command).main
    with pytest.raises(SystemExit) as stopped:
        main([])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and ("arguments are required: --out" in err or "arguments --out --score" in err)


def test_the_judge_scores_the_shipped_weights(capsys, fashion_mnist):
    """``python -m ddpm.judge --score`` prints the figure RESULTS.md gives for the shipped judge."""
    from ddpm.judge import default_weights_path, main

    assert main(["--score", str(default_weights_path())]) == 0
    assert "test accuracy 0.9375" in capsys.readouterr().out
