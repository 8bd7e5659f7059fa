"""The training images, held in memory as uint8 tensors, and the pixel <-> model-space maps.

``data.source`` picks where they come from: Fashion-MNIST (the default, below) or your own
images, a folder or a ``datasets`` dataset (``ddpm/sources.py``). Images are uint8
N x H x W when grayscale and N x 3 x H x W in colour; ``PixelFormat`` says how they become what
the network sees, C x S x S in [-1, 1], and back.

Fashion-MNIST's sources, tried in order:
  1. a directory given explicitly (config ``data.root``) or by ``$FASHION_MNIST_DIR``,
     holding the four original IDX files (``.gz`` or uncompressed);
  2. Debian's ``dataset-fashion-mnist`` package at ``/usr/share/datasets/fashion-mnist``;
  3. the Hugging Face Hub through ``datasets.load_dataset`` (needs a network).

The whole training set is 60,000 x 28 x 28 bytes (47 MB), so we never decode images per
step: the trainer keeps the uint8 tensor (on the GPU if there is one) and gathers batches
by index. ``to_model_space`` turns a uint8 batch into what the UNet sees.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import sources
from .errors import UserError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_NAME = "zalando-datasets/fashion_mnist"
IMAGE_SIZE = 28  # the stored images
PADDED_SIZE = 32  # what the model sees: 2 pixels of black on every side
PAD = (PADDED_SIZE - IMAGE_SIZE) // 2
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist`, or point $FASHION_MNIST_DIR "
    "(or data.root) at a folder with the four IDX files, or go online so "
    f"datasets.load_dataset('{HUB_NAME}') can download it"
)


SOURCES = ("fashion_mnist", "folder", "disk", "hub")
DEFAULT_IMAGE_SIZE = 32  # your own images' side when data.image_size is not set


@dataclass
class LabelledImages:
    """A labelled image set in memory.

    images: uint8, N x H x W (grayscale) or N x 3 x H x W (colour); Fashion-MNIST's are N x 28 x 28,
    0 = black background.
    labels: int64, N, class indices into ``class_names``.
    captions: one string per image, where the data has a caption column (else None).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] = CLASS_NAMES
    captions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataConfig:
    """The ``data`` section of a config: where the training images come from and how they are made
    the size the network sees."""

    # fashion_mnist; folder (class sub-folders, or a `datasets` imagefolder with metadata.jsonl / .csv);
    # disk (a `datasets` dataset written by save_to_disk); hub (a `datasets` name on the Hugging Face Hub)
    source: Literal["fashion_mnist", "folder", "disk", "hub"] = "fashion_mnist"
    path: str | None = None  # the folder, the save_to_disk folder or the Hub name (not for fashion_mnist)
    split: str = "train"  # of a `datasets` dataset
    image_size: int | None = None  # pixels per side the network sees: resized, then centre-cropped (default 32)
    channels: int | None = None  # 1: grayscale, 3: colour (default: 1 for Fashion-MNIST, 3 for your own)
    label_column: str | None = "label"  # of a `datasets` dataset; null: one class for every image
    caption_column: str | None = None  # of a `datasets` dataset, for the stages that read captions
    class_names: list[str] | None = None  # null: from the data (folder names, the label feature); runs record them
    root: str | None = None  # Fashion-MNIST: folder with the IDX files; default: $FASHION_MNIST_DIR, Debian, Hub
    hub_name: str | None = HUB_NAME  # Fashion-MNIST from the Hub; null: never go online
    flip: bool = True  # random horizontal flips
    limit: int | None = None  # train on the first N images only (tests)

    def __post_init__(self):
        if self.source == "fashion_mnist":
            if self.channels not in (None, 1):
                raise UserError("Fashion-MNIST is grayscale: data.channels must be 1 (or unset)")
            if self.image_size not in (None, PADDED_SIZE):
                raise UserError(f"Fashion-MNIST is {IMAGE_SIZE} x {IMAGE_SIZE}, padded to {PADDED_SIZE}: "
                                f"data.image_size must be {PADDED_SIZE} (or unset)")
            return
        if not self.path:
            raise UserError(f"data.source={self.source} needs data.path: the folder, or the dataset's name")
        if self.channels not in (None, 1, 3):
            raise UserError(f"data.channels must be 1 (grayscale) or 3 (colour), got {self.channels}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise UserError(f"data.image_size must be a multiple of 8 (the UNet halves it), got {self.image_size}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"data.limit must be > 0, got {self.limit}")


@dataclass(frozen=True)
class PixelFormat:
    """How a source's uint8 images become what the network sees, C x S x S in [-1, 1], and back.

    channels: 1 (images N x H x W) or 3 (N x 3 x H x W); size: the images' side; pad: black pixels
    added on every side (Fashion-MNIST: 28 + 2 x 2 = 32, a size the UNet can halve three times).
    """

    channels: int = 1
    size: int = IMAGE_SIZE
    pad: int = PAD

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """C x S x S of what the network sees."""
        side = self.size + 2 * self.pad
        return (self.channels, side, side)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One uint8 image: H x W, or 3 x H x W in colour."""
        return (self.size, self.size) if self.channels == 1 else (3, self.size, self.size)

    def to_model_space(self, images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        return to_model_space(images, flip, self.pad)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return to_pixels(x, self.pad)


FASHION_MNIST = PixelFormat()


def pixel_format(c: DataConfig) -> PixelFormat:
    """The images a ``data`` section gives: Fashion-MNIST's padded 28 x 28, or your own at
    ``image_size``, unpadded."""
    if c.source == "fashion_mnist":
        return FASHION_MNIST
    return PixelFormat(channels=c.channels or 3, size=c.image_size or DEFAULT_IMAGE_SIZE, pad=0)


def load_training_set(c: DataConfig) -> dict[str, torch.Tensor]:
    """images: uint8 N x H x W or N x 3 x H x W; labels: int64 N (the first ``c.limit`` if set)."""
    data = load_images(c)
    n = c.limit or len(data)
    return {"images": data.images[:n], "labels": data.labels[:n]}


def load_images(c: DataConfig, split: str | None = None) -> LabelledImages:
    """The images a ``data`` section names: Fashion-MNIST's ``split`` (default "train"), or your own."""
    if c.source == "fashion_mnist":
        return load_fashion_mnist(split or "train", root=c.root, hub_name=c.hub_name)
    fmt = pixel_format(c)
    own = sources.load_own_images(c, fmt.size, fmt.channels)
    return LabelledImages(own.images, own.labels, own.class_names, own.captions)


def class_names_of(c: DataConfig) -> tuple[str, ...]:
    """The class names a ``data`` section's labels index: Fashion-MNIST's, the recorded ones, or the data's."""
    if c.source == "fashion_mnist":
        return CLASS_NAMES
    if c.class_names is not None:
        return tuple(c.class_names)
    return sources.read_class_names(c)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a uint8 array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; {HOW_TO_GET}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file (bad magic number); {HOW_TO_GET}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise UserError(
            f"{path} is truncated or corrupt: header says {shape} "
            f"({int(np.prod(shape))} bytes) but holds {len(body)} bytes; {HOW_TO_GET}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_folder(folder: Path, split: str) -> LabelledImages:
    paths = [_find(folder, stem) for stem in _FILES[split]]
    if None in paths:
        missing = [s for s, p in zip(_FILES[split], paths) if p is None]
        raise UserError(f"{folder} lacks {', '.join(missing)}(.gz); {HOW_TO_GET}")
    images, labels = (read_idx(p) for p in paths)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise UserError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= len(CLASS_NAMES):
        raise UserError(f"{folder}: label {labels.max()} out of range 0..{len(CLASS_NAMES) - 1}")
    return LabelledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def _load_hub(name: str, split: str) -> LabelledImages:
    import datasets  # imported here: slow, and only needed for this source

    ds = datasets.load_dataset(name, split=split)
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
    labels = np.asarray(ds["label"], dtype=np.int64)
    return LabelledImages(torch.from_numpy(images), torch.from_numpy(labels))


def load_fashion_mnist(split: str = "train", root: str | None = None,
                       hub_name: str | None = HUB_NAME) -> LabelledImages:
    """Load a Fashion-MNIST split ("train" or "test") from the first source that has it.

    An explicit ``root`` (or ``$FASHION_MNIST_DIR``) must work: we do not silently fall
    back from a folder the user named. Set ``hub_name=None`` to never go online.
    """
    if split not in _FILES:
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")
    named = root or os.environ.get("FASHION_MNIST_DIR")
    if named:
        folder = Path(named).expanduser()
        if not folder.is_dir():
            raise UserError(f"Fashion-MNIST folder {folder} does not exist; {HOW_TO_GET}")
        return _load_idx_folder(folder, split)
    if DEBIAN_DIR.is_dir():
        return _load_idx_folder(DEBIAN_DIR, split)
    if hub_name:
        try:
            return _load_hub(hub_name, split)
        except Exception as e:  # no network, no such dataset, ...
            raise UserError(
                f"Fashion-MNIST not found locally and the Hub failed ({type(e).__name__}); {HOW_TO_GET}"
            ) from None
    raise UserError(f"Fashion-MNIST not found; {HOW_TO_GET}")


def to_model_space(images: torch.Tensor, flip: torch.Tensor | None = None, pad: int = PAD) -> torch.Tensor:
    """uint8 B x H x W (or B x 3 x H x W) in [0, 255] -> float B x C x (H + 2 pad) x (W + 2 pad) in [-1, 1];
    Fashion-MNIST's B x 28 x 28 -> B x 1 x 32 x 32.

    Pads ``pad`` pixels of black (-1) on every side, as the UNet wants a size divisible by 8.
    ``flip``: optional bool B, images to mirror left-right (training augmentation).
    """
    x = (images.unsqueeze(1) if images.dim() == 3 else images).float() / 127.5 - 1.0
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return F.pad(x, (pad, pad, pad, pad), value=-1.0)


def to_pixels(x: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """float B x C x S x S in [-1, 1] -> uint8 B x (S - 2 pad) x (S - 2 pad), or B x 3 x ... in colour:
    the inverse of ``to_model_space`` (Fashion-MNIST: B x 1 x 32 x 32 -> B x 28 x 28)."""
    side = x.shape[-1] - 2 * pad
    x = x[:, :, pad : pad + side, pad : pad + side]
    x = x[:, 0] if x.shape[1] == 1 else x
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def class_index(name_or_index: str | int, class_names: tuple[str, ...] = CLASS_NAMES) -> int:
    """Resolve "9", 9, "ankle boot" or "Ankle boot" to 9; anything else is a UserError."""
    text = str(name_or_index).strip()
    if text.lstrip("-").isdigit():
        i = int(text)
        if 0 <= i < len(class_names):
            return i
    else:
        folded = {n.lower(): i for i, n in enumerate(class_names)}
        if text.lower() in folded:
            return folded[text.lower()]
    valid = ", ".join(f"{i}={n!r}" for i, n in enumerate(class_names))
    raise UserError(f"unknown class {name_or_index!r}; valid classes: {valid}")


def read_image(path: str | Path, what: str = "--init-image", sizes: tuple[int, ...] | None = None,
               modes: tuple[str, ...] | None = None, pixels: PixelFormat = FASHION_MNIST) -> torch.Tensor:
    """An image file -> uint8 1 x 28 x 28 grayscale (resized if it is another size); ``what``
    names it in the error a file that is missing or not an image gets. With ``sizes`` (square
    sides), another size is an error and the image keeps its size; with ``modes`` (PIL's), so is
    another mode. With the ``pixels`` of your own images: made like them, uint8 1 x S x S or 1 x 3 x S x S."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{what} {path} is not an image file PIL can read (PNG, JPEG, ...)") from None
    if modes is not None and image.mode not in modes:
        raise UserError(f"{what} {path} is a {image.mode} image; it must be grayscale ({' or '.join(modes)}): "
                        f"convert it, e.g. PIL's Image.open(path).convert('L')")
    if pixels != FASHION_MNIST:
        return sources.resize_and_crop(pixels.size)(sources.to_mode(image, pixels.channels))[None]
    image = image.convert("L")
    if sizes is not None:
        if image.size not in [(s, s) for s in sizes]:
            raise UserError(f"{what} {path} is {image.size[0]} x {image.size[1]}; it must be "
                            f"{' or '.join(f'{s} x {s}' for s in sizes)}")
    elif image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy())[None]
