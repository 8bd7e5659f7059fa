"""The offline judge: a small CNN classifier for Fashion-MNIST (or any labelled images), used to score
generated images.

We cannot look at thousands of samples by eye, so a classifier trained on the *real* data
does it: its accuracy on generated images says whether the class conditioning works, and
its penultimate-layer features feed the Fréchet distance and diversity in ``ddpm/metrics.py``.

The weights ship with the package as ``ddpm/judge.safetensors``. To retrain them:

    python -m ddpm.judge --out PATH [--epochs N] [--seed S]    # PATH: ddpm/judge.safetensors to replace it
    python -m ddpm.judge --score ddpm/judge.safetensors        # its accuracy on the 10,000 test images

A judge for your own labelled images (any ``data`` section a config names: a folder, a ``datasets``
dataset; ``ddpm/sources.py``) trains on a seeded 90% of them and reports its accuracy on the other 10%,
and the Fréchet distance between those and as many training images, the floor any generator's FD
is read against:

    python -m ddpm.judge --config configs/ddpm_emoji_quick.yaml --out runs/judge_emoji.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import CLASS_NAMES, IMAGE_SIZE, LabelledImages, load_fashion_mnist
from .errors import UserError, cli_errors

TRAIN_COMMAND = "python -m ddpm.judge"
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530  # of the Fashion-MNIST training set, pixels in [0, 1]
FEATURE_DIM = 128


def conv_block(c_in: int, c_out: int, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    """3x3 conv (same size) -> ``norm`` (of c_out channels; batch norm) -> ReLU -> 2x2 max pool:
    halves height and width."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Judge(nn.Module):
    """A small CNN classifier: uint8 28 x 28 images in, 10 class logits out (or ``channels`` x ``size``
    x ``size`` images, ``num_classes`` logits: a judge of your own images).

    Three conv blocks (28 -> 14 -> 7 -> 3 pixels, 32 -> 64 -> 128 channels), then a
    fully connected layer to a ``FEATURE_DIM``-dim feature vector, then a linear head.
    ``features`` and ``forward`` look at each image and at its left-right mirror image
    and average the two (test-time augmentation: about +0.5 points of accuracy, for
    twice the compute). In eval mode (``load_judge`` returns it so) they are deterministic.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES), channels: int = 1, size: int = IMAGE_SIZE,
                 pixel_mean: float = PIXEL_MEAN, pixel_std: float = PIXEL_STD):
        super().__init__()
        self.channels, self.size, self.pixel_mean, self.pixel_std = channels, size, pixel_mean, pixel_std
        self.body = nn.Sequential(
            conv_block(channels, 32),
            conv_block(32, 64),
            conv_block(64, 128),
            nn.Flatten(),
            nn.Linear(128 * (size // 8) ** 2, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image as the judge takes it: 28 x 28, or 3 x S x S in colour."""
        return (self.size, self.size) if self.channels == 1 else (self.channels, self.size, self.size)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 28 x 28 in [0, 255] -> float B x 1 x 28 x 28, about zero mean, unit std
        (B x 3 x S x S colour images keep their shape)."""
        if images.dtype != torch.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"the judge takes uint8 B x {' x '.join(map(str, self.image_shape))} images, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        x = (images.float() / 255 - self.pixel_mean) / self.pixel_std
        # channels_last is the faster memory layout for convolutions on CPU.
        return (x.unsqueeze(1) if self.channels == 1 else x).contiguous(memory_format=torch.channels_last)

    def view_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of the images exactly as given, without the mirror image: what training uses.

        uint8 B x 28 x 28 in [0, 255] -> float B x FEATURE_DIM (>= 0, after a ReLU).
        """
        return self.body(self.normalise(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 28 x 28 in [0, 255] -> float B x FEATURE_DIM (>= 0): the mean of the
        features of each image and of its mirror image, so left-right orientation (which
        training taught the judge to ignore, by random flips) does not count."""
        return (self.view_features(images) + self.view_features(images.flip(-1))) / 2

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 B x 28 x 28 -> (features float B x FEATURE_DIM, logits float B x 10), one pass."""
        feats = self.features(images)
        return feats, self.head(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 28 x 28 in [0, 255] -> float B x 10 class logits."""
        return self.head(self.features(images))


def default_weights_path() -> Path:
    """Where the shipped weights live: ``judge.safetensors`` inside the ``ddpm`` package."""
    return Path(str(resources.files("ddpm") / "judge.safetensors"))


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """Load judge weights (default: the shipped file) into a ``Judge`` in eval mode.

    Only safetensors files are read; anything else (a pickle, a truncated file, weights
    of another architecture) is a ``UserError``, never unpickled.
    """
    path = Path(path) if path is not None else default_weights_path()
    retrain = f"run `{TRAIN_COMMAND} --out {path}` to train it (about 6 minutes on a CPU)"
    if not path.is_file():
        raise UserError(f"judge weights {path} not found; {retrain}")
    try:
        judge = Judge(**judge_shape(path))
        judge.load_state_dict(load_file(path))
    except FileNotFoundError:
        raise UserError(f"judge weights {path} not found; {retrain}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"judge weights {path} are unreadable ({reason}); {retrain}") from None
    return judge.to(device).eval()


@torch.inference_mode()
def features(judge: Judge, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The judge's features of uint8 N x ... images, float64 N x FEATURE_DIM, a batch at a time."""
    judge.eval()
    return torch.cat([judge.features(chunk).double() for chunk in images.split(batch_size)])


def judge_shape(path: Path) -> dict:
    """The ``Judge`` arguments a weights file's metadata records (none for the shipped Fashion-MNIST judge)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["judge"]) if "judge" in metadata else {}


def shape_of(images: torch.Tensor) -> tuple[int, int]:
    """(channels, size) of uint8 N x S x S or N x 3 x S x S images."""
    return (1, images.shape[-1]) if images.dim() == 3 else (images.shape[1], images.shape[-1])


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation: mirror a random half of a uint8 B x 28 x 28 batch left-right.

    (Random shifts of up to 2 pixels, tried too, cost 0.7 points of test accuracy at this
    short training budget, so there are none.)
    """
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip.view(-1, *[1] * (images.dim() - 1)), images.flip(-1), images)


@torch.inference_mode()
def accuracy(judge: Judge, data: LabelledImages, batch_size: int = 1000) -> float:
    """Fraction of ``data`` the judge (put in eval mode) classifies correctly, in [0, 1]."""
    judge.eval()
    correct = sum(
        (judge(data.images[i : i + batch_size]).argmax(dim=1) == data.labels[i : i + batch_size]).sum().item()
        for i in range(0, len(data), batch_size)
    )
    return correct / len(data)


def train_judge(train: LabelledImages, epochs: int, seed: int, batch_size: int = 128,
                max_lr: float = 3e-3, weight_decay: float = 0.05,
                pixel_stats: tuple[float, float] = (PIXEL_MEAN, PIXEL_STD)) -> Judge:
    """Train a fresh ``Judge`` on ``train`` with AdamW and a one-cycle learning rate; ``pixel_stats``:
    the mean and std of the training pixels in [0, 1] (Fashion-MNIST's by default).

    Reproducible: ``seed`` fixes the initial weights, the batch order and the augmentation.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    judge = Judge(len(train.class_names), *shape_of(train.images), *pixel_stats).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=max_lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=epochs * steps_per_epoch)
    judge.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        bar = tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            images = random_flip(train.images[batch], generator)
            loss = F.cross_entropy(judge.head(judge.view_features(images)), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return judge.eval()


def save_judge(judge: Judge, path: Path, metadata: dict[str, str]) -> None:
    """Write the weights as safetensors, with ``metadata`` (strings only) in the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants plain contiguous tensors; channels_last conv weights are not.
    tensors = {name: t.contiguous() for name, t in judge.state_dict().items()}
    save_file(tensors, path, metadata=metadata)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=TRAIN_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=None,
                        help="a config whose data section names labelled images of your own (default: Fashion-MNIST)")
    todo = parser.add_mutually_exclusive_group(required=True)
    todo.add_argument("--out", type=Path, help=f"train, and write the weights here (the shipped file, on "
                                               f"purpose: {default_weights_path()})")
    todo.add_argument("--score", type=Path, metavar="WEIGHTS", help="print these weights' accuracy on the test set")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.config is not None:
        return judge_own_images(args)
    if args.score:
        print(f"{args.score}: test accuracy {accuracy(load_judge(args.score), load_fashion_mnist('test')):.4f}")
        return 0
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    start = time.time()
    judge = train_judge(train, args.epochs, args.seed)
    test_accuracy = accuracy(judge, test)
    minutes = (time.time() - start) / 60
    print(f"test accuracy {test_accuracy:.4f} after {args.epochs} epochs ({minutes:.1f} min)")
    metadata = {"test_accuracy": f"{test_accuracy:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)}
    save_judge(judge, args.out, metadata)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); metadata {json.dumps(metadata)}")


def held_out_split(data: LabelledImages, share: float = 0.1, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    """(train, test): a seeded ``share`` of the images held out for testing, at least one per class of two or more."""
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(data), dtype=torch.bool)
    for c in range(len(data.class_names)):
        members = (data.labels == c).nonzero().squeeze(1)
        take = round(share * len(members)) or int(len(members) >= 2)
        test[members[torch.randperm(len(members), generator=generator)[:take]]] = True

    def part(mask):
        return LabelledImages(data.images[mask], data.labels[mask], data.class_names)

    return part(~test), part(test)


def judge_own_images(args) -> int:
    """``--config``: train (``--out``) or score (``--score``) a judge of the labelled images a config's data
    section names, on its held-out 10%; print the held-out accuracy and the real-vs-real FD floor."""
    from .config import build, read_yaml, to_dict
    from .data import DataConfig, load_images
    from .frechet import frechet_distance

    data_config = build(DataConfig, read_yaml(args.config).get("data"), where="data")
    train, test = held_out_split(load_images(data_config), seed=args.seed)
    if len(train.class_names) < 2 or len(test) == 0:
        raise UserError(f"the judge needs labelled images of two classes or more; {args.config}'s data has "
                        f"{len(train.class_names)} class(es) and {len(test)} image(s) to test on")
    if args.score:
        judge = load_judge(args.score)
    else:
        pixels = train.images.float() / 255
        judge = train_judge(train, args.epochs, args.seed, pixel_stats=(pixels.mean().item(), pixels.std().item()))
    test_accuracy = accuracy(judge, test)
    same_size = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: len(test)]
    floor = frechet_distance(features(judge, train.images[same_size]), features(judge, test.images))
    print(f"held-out accuracy {test_accuracy:.4f} on {len(test)} images of {len(test.class_names)} classes; "
          f"real-vs-real FD (the floor) {floor:.2f} with {len(test)} images each")
    if args.out:
        shape = {"num_classes": len(train.class_names), "channels": judge.channels, "size": judge.size,
                 "pixel_mean": judge.pixel_mean, "pixel_std": judge.pixel_std}
        metadata = {"judge": json.dumps(shape), "class_names": json.dumps(list(train.class_names)),
                    "data": json.dumps(to_dict(data_config)), "test_accuracy": f"{test_accuracy:.4f}",
                    "fd_floor": f"{floor:.4f}", "epochs": str(args.epochs), "seed": str(args.seed)}
        save_judge(judge, args.out, metadata)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
