"""Your own images: a folder, a ``datasets`` dataset saved to disk, or one on the Hub, read into memory
as Fashion-MNIST is (``ddpm/data.py``): uint8 images, int64 labels, and captions where there are some.

    data:
      source: folder          # folder | disk | hub
      path: data/emoji_32     # the folder, the save_to_disk folder, or the Hub name
      image_size: 32          # resized (shorter side), then centre-cropped to 32 x 32
      channels: 3             # 1: grayscale, 3: colour

* ``folder`` with ``metadata.jsonl`` or ``metadata.csv`` (a ``file_name`` column, and a label or
  caption column) is read by ``datasets``' imagefolder; a folder without one by torchvision's
  ``ImageFolder``: one sub-folder per class, named after it.
* ``disk`` is what ``Dataset.save_to_disk`` wrote; ``hub`` goes through ``datasets.load_dataset``.

Every image is decoded once, converted to grayscale or RGB (a transparent background becomes
white), resized so its shorter side is ``image_size`` and centre-cropped, with torchvision's
transforms. Files that PIL cannot read (not an image, truncated) are skipped and counted;
smaller images are enlarged and counted. Both counts are printed in one line each.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
ONE_CLASS = "image"  # the class name of every image when data.label_column is null


@dataclass
class OwnImages:
    """What ``load_own_images`` read: uint8 images N x S x S (or N x 3 x S x S), int64 labels N into
    ``class_names``, and N captions or None."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    captions: list[str] | None


@dataclass
class Records:
    """What a source lists before any image is decoded.

    files: per image, a path or a ``datasets`` image dict (``{"bytes": ..., "path": ...}``).
    labels: int64 N, indices into ``class_names``. captions: N strings, or None.
    """

    files: list
    labels: np.ndarray
    class_names: tuple[str, ...]
    captions: list[str] | None
    where: str  # how the messages name the source


def load_own_images(c, size: int, channels: int) -> OwnImages:
    """All images of the folder or ``datasets`` source a ``DataConfig`` ``c`` names, decoded, converted to
    ``channels`` (1 or 3) and made ``size`` x ``size``. A run's recorded ``data.class_names`` must be the data's."""
    records = list_records(c)
    if c.class_names is not None and tuple(c.class_names) != records.class_names:
        raise UserError(f"{records.where} has the classes {list(records.class_names)}, but this run was trained on "
                        f"{list(c.class_names)}; restore the data, or train a new run")
    images, kept = decode_all(records, size, channels)
    labels = torch.from_numpy(records.labels[kept].astype(np.int64))
    captions = [records.captions[i] for i in kept] if records.captions is not None else None
    return OwnImages(images, labels, records.class_names, captions)


def read_class_names(c) -> tuple[str, ...]:
    """The class names of the source a ``DataConfig`` names, without decoding its images."""
    return list_records(c).class_names


def read_captions(c) -> tuple[list[str], list[int]]:
    """Every image's caption (``data.caption_column``; without one, its class name) and label, without
    decoding the images: what a text run's caption table holds."""
    records = list_records(c)
    labels = records.labels.tolist()
    captions = records.captions or [records.class_names[label] for label in labels]
    return captions, labels


# -- listing: which files, which labels ---------------------------------------------------


def list_records(c) -> Records:
    key = (c.source, c.path, c.split, c.label_column, c.caption_column)
    return _list_records(*key)


@functools.lru_cache(maxsize=4)
def _list_records(source: str, path: str, split: str, label_column: str | None,
                  caption_column: str | None) -> Records:
    if source == "folder":
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.path {folder} is not a folder")
        if not any((folder / name).is_file() for name in METADATA_FILES):
            return _class_folders(folder, label_column, caption_column)
    dataset = _open_dataset(source, path, split)
    return _dataset_records(dataset, f"{source} {path}", label_column, caption_column)


def _class_folders(folder: Path, label_column: str | None, caption_column: str | None) -> Records:
    """torchvision's ImageFolder convention: ``folder/CLASS/image.png``, classes in sorted order."""
    from torchvision.datasets import ImageFolder

    if caption_column is not None:
        raise UserError(f"{folder} has class sub-folders but no metadata.jsonl / metadata.csv, so no captions; "
                        f"add one with the columns file_name and {caption_column}, or set data.caption_column=null")
    try:
        found = ImageFolder(str(folder), loader=lambda path: path)
    except FileNotFoundError as e:  # no class folder, or no image in any of them
        raise UserError(f"{folder} holds no images in class sub-folders ({e}); put them in FOLDER/CLASS/*.png, or "
                        f"add a metadata.jsonl with the columns file_name and label") from None
    paths, labels = zip(*found.samples)
    classes = tuple(found.classes) if label_column is not None else (ONE_CLASS,)
    labels = np.asarray(labels) if label_column is not None else np.zeros(len(paths), dtype=np.int64)
    return Records(list(paths), labels, classes, None, str(folder))


def _open_dataset(source: str, path: str, split: str):
    """A ``datasets.Dataset``: an imagefolder with metadata, a ``save_to_disk`` folder, or a Hub dataset."""
    import datasets

    if source != "hub":  # reading a local folder takes a moment: no progress bars on a command's error output
        datasets.disable_progress_bars()
    try:
        if source == "folder":
            dataset = datasets.load_dataset("imagefolder", data_dir=path, split=split)
        elif source == "disk":
            if not Path(path).expanduser().is_dir():
                raise UserError(f"data.path {path} is not a folder written by save_to_disk")
            dataset = datasets.load_from_disk(str(Path(path).expanduser()))
        else:
            dataset = datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except Exception as e:  # no such dataset, no network, a broken metadata file, ...
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read the {source} dataset {path}: {type(e).__name__}: {first_line}") from None
    finally:
        datasets.enable_progress_bars()
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"{path} has the splits {list(dataset)}, not data.split={split!r}")
        dataset = dataset[split]
    return dataset


def _dataset_records(dataset, where: str, label_column: str | None, caption_column: str | None) -> Records:
    """The image column (kept undecoded), the labels and the captions of a ``datasets.Dataset``."""
    import datasets

    image_columns = [name for name, f in dataset.features.items() if isinstance(f, datasets.Image)]
    if not image_columns:
        raise UserError(f"{where} has no image column (its columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise UserError(f"{where} holds no images")
    for column, key in ((label_column, "label_column"), (caption_column, "caption_column")):
        if column is not None and column not in dataset.column_names:
            raise UserError(f"{where} has no column {column!r} (data.{key}); its columns: "
                            f"{', '.join(dataset.column_names)}" + ("; set data.label_column=null for one class"
                                                                   if key == "label_column" else ""))
    files = dataset.cast_column(image_columns[0], datasets.Image(decode=False))[image_columns[0]]
    if label_column is None:
        labels, classes = np.zeros(len(dataset), dtype=np.int64), (ONE_CLASS,)
    else:
        labels, classes = _labels(dataset, label_column, where)
    captions = [str(t) for t in dataset[caption_column]] if caption_column is not None else None
    return Records(list(files), labels, classes, captions, where)


def _labels(dataset, column: str, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """int64 N and the class names: a ``ClassLabel`` feature's names, sorted strings, or the integers."""
    import datasets

    feature, values = dataset.features[column], dataset[column]
    if isinstance(feature, datasets.ClassLabel):
        return np.asarray(values, dtype=np.int64), tuple(feature.names)
    if all(isinstance(v, str) for v in values):
        names = tuple(sorted(set(values)))
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[v] for v in values], dtype=np.int64), names
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return np.asarray(values, dtype=np.int64), tuple(str(i) for i in range(max(values) + 1))
    raise UserError(f"{where}: the label column {column!r} must hold class names or integers >= 0")


# -- decoding: every image to uint8 at the configured size -----------------------------


def decode_all(records: Records, size: int, channels: int) -> tuple[torch.Tensor, list[int]]:
    """uint8 N x S x S (grayscale) or N x 3 x S x S, and the indices of the records kept (readable)."""
    transform = resize_and_crop(size)
    images, kept, unreadable, small = [], [], [], 0
    for i, file in enumerate(records.files):
        image = open_image(file)
        if isinstance(image, str):
            unreadable.append(image)
            continue
        small += min(image.size) < size
        images.append(transform(to_mode(image, channels)))
        kept.append(i)
    if unreadable:
        print(f"data: skipped {len(unreadable)} of {len(records.files)} files that are no image PIL can read "
              f"(first: {unreadable[0]})")
    if not images:
        raise UserError(f"{records.where} holds no image PIL can read ({len(records.files)} files tried)")
    if small:
        print(f"data: {small} of {len(images)} images are smaller than {size} pixels a side and were enlarged")
    stacked = torch.stack(images)
    return (stacked[:, 0] if channels == 1 else stacked), kept


def open_image(file):
    """A path or a ``datasets`` image dict -> a loaded PIL image, or a string saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(file, dict):
        name = file.get("path") or "an image"
        source = io.BytesIO(file["bytes"]) if file.get("bytes") else file.get("path")
    else:
        name = source = file
    try:
        image = Image.open(source)
        image.load()  # decode now: a truncated file fails here, not while training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{name}: {type(e).__name__}: {e}"
    return image


def to_mode(image, channels: int):
    """A PIL image of any mode (L, P, RGBA, CMYK, ...) -> L (channels 1) or RGB (3); what is
    transparent becomes white."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def resize_and_crop(size: int):
    """PIL image -> uint8 C x size x size: its shorter side resized to ``size`` (bicubic, antialiased),
    then the centre cropped."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.PILToTensor(),
    ])
