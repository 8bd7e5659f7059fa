"""The subject of a DreamBooth fine-tune: a few pictures of one item, and how close samples come to it.

    python -m conditioning.finetune.subject --class Bag --k 4 --out conditioning/subjects/bag

Fashion-MNIST has one picture per item, so the default subject stands in for "3-5 photos of
one thing" with one distinctive *test* image (never trained on) and its k - 1 nearest
neighbours among the test images of its class, in pixel space (so they look alike):

    coherence(i)       = mean pixel cosine between the k images (i and its neighbours)
    distinctness(i)    = mean pixel cosine of the k images to every test image of the class
    chosen             = argmax_i coherence(i) - distinctness(i)

over the test images the judge classifies correctly (so "a bag" is still a bag). The chosen
indices and scores are written next to the PNGs in ``subject.json``.

Measuring a fine-tune (the DreamBooth paper's metrics, with our judge standing in for DINO and
our CLIP for CLIP): ``similarity`` of samples to the subject images against their similarity
to the rest of the class, in judge features and in CLIP image embeddings.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ddpm.data import CLASS_NAMES, IMAGE_SIZE, class_index, load_fashion_mnist
from ddpm.errors import UserError, cli_errors
from ddpm.evaluate import cached_judge
from ddpm.metrics import embed

DEFAULT_SUBJECT = "bag"  # conditioning/subjects/bag: four test images of one small box bag on a long strap


def shipped_subjects() -> Path:
    return Path(str(importlib.resources.files("conditioning") / "subjects"))


def subject_folder(name_or_path: str) -> Path:
    """A folder of PNGs, or the name of a subject shipped in ``conditioning/subjects/``."""
    shipped = shipped_subjects() / name_or_path
    return shipped if "/" not in name_or_path and shipped.is_dir() else Path(name_or_path)


def read_subject(name_or_path: str) -> torch.Tensor:
    """The subject's images: uint8 K x 28 x 28 (every PNG/JPEG in the folder, sorted by name)."""
    folder = subject_folder(name_or_path)
    if not folder.is_dir():
        shipped = ", ".join(p.name for p in shipped_subjects().iterdir() if p.is_dir())
        raise UserError(f"subject folder {folder} does not exist; give a folder of 28 x 28 PNGs "
                        f"or a shipped subject ({shipped})")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UserError(f"subject folder {folder} holds no images (.png, .jpg); put 3-5 pictures of the subject "
                        f"in it")
    images = []
    for path in files:
        try:
            image = Image.open(path).convert("L")
        except (UnidentifiedImageError, OSError):
            raise UserError(f"{path} is not an image file PIL can read; remove it from the subject folder") from None
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"{path} is {image.size[0]} x {image.size[1]}; subject images must be "
                            f"{IMAGE_SIZE} x {IMAGE_SIZE} grayscale, like Fashion-MNIST")
        images.append(torch.from_numpy(np.asarray(image).copy()))
    return torch.stack(images)


def subject_class(name_or_path: str) -> str | None:
    """The class a subject folder's ``subject.json`` names, if it has one."""
    info = subject_folder(name_or_path) / "subject.json"
    return json.loads(info.read_text())["class"] if info.is_file() else None


# -- choosing the default subject ---------------------------------------------------------------


def choose_subject(images: torch.Tensor, judged_right: torch.Tensor, k: int) -> tuple[torch.Tensor, float, float]:
    """Of one class's images (uint8 N x 28 x 28), the indices of the most distinctive tight group of
    k: an anchor first, then its k - 1 nearest neighbours (see the module docstring). Anchors and
    neighbours are drawn from the images the judge classifies right (bool N). Returns (int64 k,
    coherence, distinctness)."""
    pixels = F.normalize(images.flatten(1).float(), dim=1)
    candidates = judged_right.nonzero().flatten()
    sim = pixels[candidates] @ pixels[candidates].T
    sim.fill_diagonal_(-2)
    groups = torch.cat([torch.arange(len(candidates))[:, None], sim.topk(k - 1, dim=1).indices], 1)  # M x k
    members = pixels[candidates][groups]  # M x k x D
    pairwise = members @ members.transpose(1, 2)
    coherence = (pairwise.sum((1, 2)) - k) / (k * (k - 1))
    distinctness = (members.mean(1) @ pixels.T).mean(1)
    best = (coherence - distinctness).argmax()
    return candidates[groups[best]], coherence[best].item(), distinctness[best].item()


def write_subject(class_name: str, k: int, out: Path) -> list[int]:
    """Choose a subject among the test images of ``class_name``; write k PNGs and subject.json."""
    c = class_index(class_name)
    test = load_fashion_mnist("test")
    _, logits = embed(cached_judge(), test.images)
    in_class = (test.labels == c).nonzero().flatten()
    right = logits[in_class].argmax(1) == c
    chosen, coherence, distinctness = choose_subject(test.images[in_class], right, k)
    indices = in_class[chosen].tolist()
    out.mkdir(parents=True, exist_ok=True)
    for i, index in enumerate(indices):
        Image.fromarray(test.images[index].numpy()).save(out / f"{i}.png")
    info = {"class": CLASS_NAMES[c], "test_indices": indices, "coherence": round(coherence, 4),
            "distinctness": round(distinctness, 4),
            "how": "python -m conditioning.finetune.subject --class " + f'"{CLASS_NAMES[c]}" --k {k}: the judged-right '
                   "test image whose k - 1 nearest pixel-space neighbours maximise coherence - distinctness"}
    (out / "subject.json").write_text(json.dumps(info, indent=1) + "\n")
    return indices


# -- how close samples come to it ---------------------------------------------------------------


def rest_of_class(class_name: str, subject: torch.Tensor) -> torch.Tensor:
    """The test images of the subject's class, the subject's own pictures left out: uint8 M x 28 x 28."""
    test = load_fashion_mnist("test")
    images = test.images[test.labels == class_index(class_name)]
    is_subject = (images[:, None] == subject[None]).flatten(2).all(2).any(1)
    return images[~is_subject]


class Likeness:
    """Mean cosine similarity of images to the subject's pictures and to the rest of its class, in
    two embeddings: the judge's features (what the DreamBooth paper's DINO score measures) and, with
    a ``scorer``, our CLIP's image embeddings (its CLIP-I); and the *subject rate*: the share of
    images that are the subject, i.e. more like its pictures (mean judge cosine) than 95% of the
    class's other test images are (so 5% of real other bags count, by construction)."""

    RATE_QUANTILE = 0.95

    def __init__(self, subject: torch.Tensor, rest: torch.Tensor, scorer=None):
        self.scorer = scorer
        self.subject = {name: f(subject) for name, f in self.embeddings().items()}
        self.rest = {name: f(rest) for name, f in self.embeddings().items()}
        self.subject_threshold = torch.quantile(self.likeness(self.rest["judge"], "judge"), self.RATE_QUANTILE).item()

    def embeddings(self) -> dict:
        judge = cached_judge()
        out = {"judge": lambda images: F.normalize(embed(judge, images)[0].float(), dim=1)}
        if self.scorer is not None:
            out["clip"] = self.scorer.image_embeds
        return out

    def likeness(self, embeddings: torch.Tensor, name: str) -> torch.Tensor:
        """float N: each embedding's mean cosine to the subject's pictures in embedding ``name``."""
        return (embeddings @ self.subject[name].T).mean(1)

    def scores(self, name: str, embeddings: torch.Tensor, likeness: torch.Tensor) -> dict[str, float]:
        """``<name>_subject``: the mean of ``likeness`` (float N, each image's mean cosine to the subject);
        ``<name>_rest``: the images' mean cosine to the rest of the class; for the judge, ``subject_rate``:
        the share of images whose likeness passes the threshold."""
        out = {f"{name}_subject": likeness.mean().item(),
               f"{name}_rest": (embeddings @ self.rest[name].T).mean().item()}
        if name == "judge":
            out["subject_rate"] = (likeness > self.subject_threshold).float().mean().item()
        return out

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        """``scores`` of ``images`` in every embedding (``subject_rate``: the share that are the subject)."""
        out = {}
        for name, f in self.embeddings().items():
            e = f(images)
            out.update(self.scores(name, e, self.likeness(e, name)))
        return out

    def ceiling(self) -> dict[str, float]:
        """The subject's pictures among themselves (each to the others): what a perfect copy would score."""
        out = {}
        for name, e in self.subject.items():
            out.update(self.scores(name, e, ((e @ e.T).sum(1) - 1) / (len(e) - 1)))
        return out


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--class", dest="class_name", default="Bag")
    parser.add_argument("--k", type=int, default=4, help="pictures of the subject (3-5)")
    parser.add_argument("--out", required=True, help=f"the folder to write (the shipped subject, on purpose: "
                                                      f"{shipped_subjects() / DEFAULT_SUBJECT})")
    args = parser.parse_args(argv)
    if not 2 <= args.k <= 10:
        raise UserError(f"--k must be between 2 and 10, got {args.k}")
    indices = write_subject(args.class_name, args.k, Path(args.out))
    print(f"wrote {args.k} test images {indices} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
