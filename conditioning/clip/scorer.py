"""Our CLIP as a judge of image-text agreement, for any run that wants one: the CLIP score, zero-shot
classification and the ranking of candidates (``sample.py --clip``, ``--rank``; DreamBooth's likeness).

    scorer = load_scorer("runs/clip_fashion_quick")     # ddpm.runs: a CLIP run's ``ClipStage.scorer``
    scorer.score(images, ["a photo of a coat"] * len(images))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.evaluate import best_of_groups

from conditioning.text.captions import prompts_for


def to_clip_space(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B x 28 x 28 -> float B x 1 x 28 x 28 in [-1, 1], mirrored where ``flip`` (bool B)."""
    x = images.float().div(127.5).sub(1).unsqueeze(1)
    return x if flip is None else torch.where(flip[:, None, None, None], x.flip(-1), x)



class ClipScorer:
    """A trained CLIP as a judge of image-text agreement: embeddings, the CLIP score, zero-shot
    classification and the ranking of candidates."""

    def __init__(self, model: nn.Module, image_features: Callable[[torch.Tensor], torch.Tensor],
                 text_features: Callable[[list[str]], torch.Tensor], batch_size: int = 1000):
        """``image_features``: float B x 1 x 28 x 28 in [-1, 1] -> float B x D; ``text_features``:
        B prompts -> float B x D; both the model's, not normalised (``ClipStage.scorer`` makes them)."""
        self.model = model.eval()
        self.image_features, self.text_features = image_features, text_features
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 28 x 28 -> float N x D, unit length."""
        return torch.cat([F.normalize(self.image_features(to_clip_space(chunk.to(self.device))), dim=-1).cpu()
                          for chunk in images.split(self.batch_size)])

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> float N x D, unit length (each distinct prompt encoded once)."""
        unique = list(dict.fromkeys(prompts))
        embeds = F.normalize(self.text_features(unique), dim=-1).cpu()
        return embeds[[unique.index(p) for p in prompts]]

    def similarity(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """float N_images x N_prompts: cosines."""
        return self.image_embeds(images) @ self.text_embeds(prompts).T

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The CLIP score of each (image, prompt) pair, as torchmetrics defines it:
        100 * max(cos(image, prompt), 0). float N."""
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return 100 * cos.clamp_min(0)

    def score_classes(self, images: torch.Tensor, labels: torch.Tensor, phrasings: str = "train") -> torch.Tensor:
        """The CLIP score of each image asked for by class label (int64 N) against its class's prompt, the
        phrasings cycled as a text run's ``generate`` asks for them. float N."""
        return self.score(images, prompts_for(labels, phrasings))

    def score_labels(self, images: torch.Tensor, labels: torch.Tensor, phrasings: str = "train") -> float:
        """The mean of ``score_classes``."""
        return self.score_classes(images, labels, phrasings).mean().item()

    def class_embeds(self, per_class: list[list[str]]) -> torch.Tensor:
        """Each class's phrasings, embedded, averaged and renormalised (CLIP's prompt ensembling):
        float C x D."""
        return F.normalize(torch.stack([self.text_embeds(p).mean(0) for p in per_class]), dim=-1)

    def classify(self, images: torch.Tensor, per_class: list[list[str]]) -> torch.Tensor:
        """Zero-shot classification: int64 N, the class whose prompts the image is closest to."""
        return (self.image_embeds(images) @ self.class_embeds(per_class).T).argmax(1)

    def rank(self, images: torch.Tensor, prompts: list[str], group: int, keep: int) -> torch.Tensor:
        """Indices of the ``keep`` best-scoring images of each consecutive ``group`` of candidates
        (the candidates of one prompt), best first: int64 (N / group) * keep."""
        return best_of_groups(self.score(images, prompts), group, keep)
