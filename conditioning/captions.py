"""Captions for Fashion-MNIST: each class said many ways, so the model learns words, not ten ids.

A caption is a template ("a photo of {}") filled with a name for the class ("an ankle boot",
"a boot"), with the right article. Training draws a caption per image and step from its
class's list, seeded, so runs are reproducible. ``UNSEEN`` holds phrasings that never occur
in training (new templates and new names): a model that scores well on them has learnt the
meaning of the words, not the exact strings.
"""

from __future__ import annotations

import torch

from ddpm.data import CLASS_NAMES
from ddpm.errors import UserError

NAMES = {
    "T-shirt/top": ["t-shirt", "tee", "top", "short-sleeved top"],
    "Trouser": ["pair of trousers", "pair of pants", "pair of jeans", "pair of slacks"],
    "Pullover": ["pullover", "sweater", "jumper", "knitted sweater"],
    "Dress": ["dress", "frock", "summer dress", "gown"],
    "Coat": ["coat", "jacket", "winter coat", "overcoat"],
    "Sandal": ["sandal", "open shoe", "summer sandal", "strappy sandal"],
    "Shirt": ["shirt", "button-up shirt", "long-sleeved shirt", "blouse"],
    "Sneaker": ["sneaker", "trainer", "running shoe", "sports shoe"],
    "Bag": ["bag", "handbag", "purse", "tote bag"],
    "Ankle boot": ["ankle boot", "boot", "short boot", "leather boot"],
}
TEMPLATES = [
    "{}",
    "a photo of {}",
    "a black and white picture of {}",
    "a picture of {}",
    "a small grayscale image of {}",
    "a product photo of {}",
    "{} on a black background",
    "an image showing {}",
]
UNSEEN = {
    "T-shirt/top": ["a catalogue shot of a plain crew-neck tshirt", "a simple top with short sleeves"],
    "Trouser": ["a catalogue shot of long denim trousers", "some long pants for men"],
    "Pullover": ["a catalogue shot of a warm woollen pullover", "a cosy knit for winter"],
    "Dress": ["a catalogue shot of an elegant evening dress", "a one-piece dress for women"],
    "Coat": ["a catalogue shot of a thick parka", "a heavy coat with a zip"],
    "Sandal": ["a catalogue shot of beach sandals", "flip-flops for the summer"],
    "Shirt": ["a catalogue shot of a checked flannel shirt", "a collared shirt with buttons"],
    "Sneaker": ["a catalogue shot of white canvas sneakers", "a low athletic shoe for jogging"],
    "Bag": ["a catalogue shot of a leather satchel", "a bag with a shoulder strap"],
    "Ankle boot": ["a catalogue shot of chelsea boots", "a heeled boot that covers the ankle"],
}


def with_article(name: str) -> str:
    if name.startswith(("pair of", "some ")):
        return f"a {name}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def class_prompt(class_name: str) -> str:
    """The plainest prompt for a class, "a photo of a t-shirt": what preview grids ask for."""
    return f"a photo of {with_article(NAMES[class_name][0])}"


def class_captions(class_names: tuple[str, ...] = CLASS_NAMES) -> list[list[str]]:
    """For each class, every template filled with every name: 10 x 32 training captions."""
    return [[t.format(with_article(n)) for t in TEMPLATES for n in NAMES[c]] for c in class_names]


def unseen_captions(class_names: tuple[str, ...] = CLASS_NAMES) -> list[list[str]]:
    """For each class, phrasings that share no full caption with ``class_captions``."""
    return [UNSEEN[c] for c in class_names]


PHRASINGS = {"train": class_captions, "unseen": unseen_captions}  # class names -> prompts, per class


def phrasings_of(kind: str, class_names: tuple[str, ...] = CLASS_NAMES) -> list[list[str]]:
    """Each class's prompts of one kind: "train" (the training captions) or "unseen"."""
    if kind not in PHRASINGS:
        raise UserError(f"unknown phrasings {kind!r}; valid: {', '.join(PHRASINGS)}")
    return PHRASINGS[kind](class_names)


def prompts_for(labels: torch.Tensor, kind: str = "train", class_names: tuple[str, ...] = CLASS_NAMES) -> list[str]:
    """A prompt per class label (int64 N), cycling through the class's phrasings of ``kind``."""
    per_class = phrasings_of(kind, class_names)
    seen: dict[int, int] = {}
    prompts = []
    for label in labels.tolist():
        i = seen[label] = seen.get(label, -1) + 1
        prompts.append(per_class[label][i % len(per_class[label])])
    return prompts


class CaptionTable:
    """Every training caption in one list (after ``first``, e.g. the null prompt ""), and a
    seeded draw of one caption of its class for each image."""

    def __init__(self, class_names: tuple[str, ...] = CLASS_NAMES, first: tuple[str, ...] = ()):
        per_class = class_captions(class_names)
        self.prompts = [*first, *(c for captions in per_class for c in captions)]
        self.counts = torch.tensor([len(c) for c in per_class])
        self.starts = len(first) + torch.cumsum(self.counts, 0) - self.counts  # each class's first caption

    def draw(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """int64 B: indices into ``prompts``, a caption of each label's class, uniformly at random."""
        starts, counts = self.starts.to(labels.device)[labels], self.counts.to(labels.device)[labels]
        return starts + (torch.rand(len(labels), generator=generator, device=labels.device) * counts).long()
