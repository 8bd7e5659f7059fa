"""Captions for Fashion-MNIST: each class said many ways, so the model learns words, not ten ids
(your own images bring their own captions: ``DataCaptionTable``).

A caption is a template ("a photo of {}") filled with a name for the class ("an ankle boot",
"a boot"), with the right article. Training draws a caption per image and step from its
class's list, seeded, so runs are reproducible. ``UNSEEN`` holds phrasings that never occur
in training (new templates and new names): a model that scores well on them has learnt the
meaning of the words, not the exact strings.

With ``captions.attributes`` a caption also names some of the image's measured attributes
(``attributes.py``): "a photo of a large dark coat", "a pair of patterned trousers". Each
attribute is named with probability ``p_mention`` (so a share of captions still names only the
class), never for the (class, word) pairs of ``held_out``: those combinations are never seen in
training, and test whether the model composes words it knows.
"""

from __future__ import annotations

import dataclasses

import torch

from ddpm.data import CLASS_NAMES
from ddpm.errors import UserError

from conditioning.text.attributes import ATTRIBUTE_WORDS, ATTRIBUTES

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
# the templates that name no attribute (not "a small grayscale image of {}", whose "small" would)
PLAIN_TEMPLATES = [t for t in TEMPLATES if not ATTRIBUTE_WORDS & set(t.split())]
# those templates with no garment in them ("a photo of", ""): captions that describe any image
NAMELESS = [" ".join(t.format("").split()) for t in PLAIN_TEMPLATES]
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


PHRASE_ORDER = ("size", "brightness", "texture")  # "a large dark patterned coat"
HELD_OUT = [["Trouser", "patterned"], ["Sandal", "dark"], ["Bag", "small"], ["Shirt", "light"]]


@dataclasses.dataclass
class CaptionConfig:
    """The ``captions`` section: what a training caption says besides the class."""

    attributes: list[str] = dataclasses.field(default_factory=list)  # of ATTRIBUTES; [] = the class only
    p_mention: float = 0.5  # each listed attribute is named with this probability
    held_out: list[list[str]] = dataclasses.field(default_factory=lambda: [list(p) for p in HELD_OUT])

    def __post_init__(self):
        unknown = set(self.attributes) - set(ATTRIBUTES)
        if unknown:
            raise UserError(f"unknown captions.attributes {sorted(unknown)}; valid: {', '.join(ATTRIBUTES)}")
        if not 0 <= self.p_mention <= 1:
            raise UserError(f"captions.p_mention must be in [0, 1], got {self.p_mention}")
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in CLASS_NAMES or pair[1] not in ATTRIBUTE_WORDS:
                raise UserError(f"captions.held_out entries are [class, word] with a class of {list(CLASS_NAMES)} "
                                f"and a word of {sorted(ATTRIBUTE_WORDS)}; got {pair}")


def with_attributes(name: str, words: list[str]) -> str:
    """A class name with attribute words, in English order: ("coat", [dark, large]) -> "large dark
    coat", ("pair of jeans", [patterned]) -> "pair of patterned jeans"."""
    words = sorted(words, key=lambda w: PHRASE_ORDER.index(word_attribute(w)))
    if name.startswith("pair of "):
        return " ".join(["pair of", *words, name.removeprefix("pair of ")])
    return " ".join([*words, name])


def word_attribute(word: str) -> str:
    """The attribute a word names: "dark" -> "brightness"."""
    return next(a for a, pair in ATTRIBUTES.items() if word in pair)


def named_bins(caption: str) -> list[int]:
    """The bin a caption names of each attribute (the order of ``ATTRIBUTES``), or -1:
    "a photo of a large coat" -> [-1, 1, -1]."""
    words = set(caption.split())
    return [next((b for b, w in enumerate(pair) if w in words), -1) for pair in ATTRIBUTES.values()]


def attribute_prompt(class_name: str, words: list[str]) -> str:
    """The plainest prompt with attributes, "a photo of a dark coat": what adherence is measured on."""
    return f"a photo of {with_article(with_attributes(NAMES[class_name][0], words))}"


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
        self.hold(class_captions(class_names), first)

    def hold(self, per_class: list[list[str]], first: tuple[str, ...]) -> None:
        """Keep every class's captions in one list, after ``first``, and where each class's start."""
        self.prompts = [*first, *(c for captions in per_class for c in captions)]
        self.counts = torch.tensor([len(c) for c in per_class])
        self.starts = len(first) + torch.cumsum(self.counts, 0) - self.counts  # each class's first caption

    def draw(self, labels: torch.Tensor, generator: torch.Generator, bins: torch.Tensor | None = None) -> torch.Tensor:
        """int64 B: indices into ``prompts``, a caption of each label's class, uniformly at random
        (``bins``, the images' attributes, are for ``AttributeCaptionTable``)."""
        starts, counts = self.starts.to(labels.device)[labels], self.counts.to(labels.device)[labels]
        return starts + (torch.rand(len(labels), generator=generator, device=labels.device) * counts).long()


class AttributeCaptionTable(CaptionTable):
    """Every caption with any choice of named attributes, in one list, and a seeded draw that
    names each attribute of an image with probability ``p_mention``, except held-out pairs.

    Per class the captions are ordered (template and name, choice of words): the choice is one
    digit per attribute of ``config.attributes``, 0 = not named, 1 = its first word, 2 = its
    second, read in base 3. The held-out captions are in the list (it is a product) but never drawn.
    """

    def __init__(self, config: CaptionConfig, class_names: tuple[str, ...] = CLASS_NAMES, first: tuple[str, ...] = ()):
        self.config = config
        self.attributes = [list(ATTRIBUTES).index(a) for a in config.attributes]  # columns of measure()
        choices = self.word_choices()
        self.hold([[t.format(with_article(with_attributes(n, chosen))) for t in PLAIN_TEMPLATES for n in NAMES[c]
                    for chosen in choices] for c in class_names], first)
        self.n_choices = len(choices)
        # allowed[c, k, b]: may class c's captions name word b of the k-th listed attribute?
        self.allowed = torch.ones(len(class_names), len(self.attributes), 2, dtype=torch.bool)
        for class_name, word in config.held_out:
            attribute = word_attribute(word)
            if attribute in config.attributes:
                k = config.attributes.index(attribute)
                self.allowed[class_names.index(class_name), k, ATTRIBUTES[attribute].index(word)] = False

    def word_choices(self) -> list[list[str]]:
        """Every choice of words, in base-3 order: [[], [dark], [light], [small], [small, dark], ...]."""
        choices = [[]]
        for attribute in self.config.attributes:  # the first attribute is the lowest digit
            choices = [c + ([] if digit == 0 else [ATTRIBUTES[attribute][digit - 1]])
                       for digit in range(3) for c in choices]
        return choices

    def draw(self, labels: torch.Tensor, generator: torch.Generator, bins: torch.Tensor | None = None) -> torch.Tensor:
        """int64 B: a caption of each image's class (a uniform template and name), naming each
        attribute of ``bins`` (int64 B x 3, ``AttributeBins.bins``) with probability ``p_mention``."""
        device = labels.device
        phrasing = (torch.rand(len(labels), generator=generator, device=device)
                    * (self.counts.to(device)[labels] // self.n_choices)).long()
        choice = torch.zeros_like(labels)
        for k, column in enumerate(self.attributes):
            b = bins[:, column]
            named = torch.rand(len(labels), generator=generator, device=device) < self.config.p_mention
            named &= self.allowed.to(device)[labels, k, b]
            choice += torch.where(named, b + 1, 0) * 3**k
        return self.starts.to(device)[labels] + phrasing * self.n_choices + choice


class DataCaptionTable(CaptionTable):
    """Your own images' captions (``data.caption_column``; without one, their class names): each image
    has one, its own, and a class's phrasings are its images' captions, each once."""

    def __init__(self, captions: list[str], labels: list[int], class_names: tuple[str, ...],
                 first: tuple[str, ...] = ()):
        self.per_class = [list(dict.fromkeys(c for c, label in zip(captions, labels) if label == k))
                          for k in range(len(class_names))]
        self.hold(self.per_class, first)
        self.index = {}
        for i, prompt in enumerate(self.prompts):
            self.index.setdefault(prompt, i)

    def ids(self, captions: list[str]) -> torch.Tensor:
        """int64 N: each caption's index into ``prompts``."""
        return torch.tensor([self.index[c] for c in captions], dtype=torch.long)

    def prompts_for(self, labels: torch.Tensor, kind: str = "train") -> list[str]:
        """A prompt per class label (int64 N), cycling through the class's captions."""
        if kind != "train":
            raise UserError(f"your own images' captions have no {kind!r} phrasings; use the training ones")
        seen: dict[int, int] = {}
        prompts = []
        for label in labels.tolist():
            i = seen[label] = seen.get(label, -1) + 1
            prompts.append(self.per_class[label][i % len(self.per_class[label])])
        return prompts


def caption_table(config: CaptionConfig, class_names: tuple[str, ...] = CLASS_NAMES, first: tuple[str, ...] = ()
                  ) -> CaptionTable:
    """The class-only table when no attribute is listed (as before attributes existed), else the
    attribute table."""
    if not config.attributes:
        return CaptionTable(class_names, first)
    return AttributeCaptionTable(config, class_names, first)
