"""A CLIP whose text tower is a locked pretrained sentence encoder: only the image side learns.

    python train.py configs/clip_fashion_locked_quick.yaml

What changes from ``stage.py``'s CLIP. There both towers train from scratch, and a text tower that
has read 320 captions knows some 60 words: "parka" or "satchel" mean nothing to it. Here the text
tower is all-MiniLM-L6-v2 (``model.locked_text_tower``), pretrained on a billion sentence pairs and
never trained here: a caption's embedding is the mean of its last hidden states over its tokens
(the sentence-transformers recipe). The contrastive loss is the same; it now moves the
image tower to where the language already put each class (the reverse of LiT, Zhai et al. 2022,
which locks the image tower; DeViSE, Frome et al. 2013, did this with word vectors). An unseen
phrasing lands wherever MiniLM puts it, near what it means rather than at random.

    image  uint8 28 x 28 --image tower--> width --visual_projection--> D   \
                                                                              cosine x s
    caption --locked MiniLM, mean-pooled--> 384 --text head--> D             /

The text head is either none (D = 384: the image tower learns MiniLM's space as it is) or a
linear map initialised to the identity (the space may bend a little towards what the images can
tell apart). The image tower is a ViT (transformers' ``CLIPVisionModel``) or ``ConvImageTower``,
the judge's small CNN. ``LockedTextClip`` holds only what trains; the locked tower lives outside
it, so it never reaches the optimizer, the EMA or a checkpoint. ``save_pretrained`` writes its
config.json (naming the locked tower) and model.safetensors: a folder transformers' ``CLIPModel``
cannot load (its text tower is a CLIP transformer), which this stage's ``load_model`` reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ddpm.data import IMAGE_SIZE
from ddpm.judge import conv_block


class ConvImageTower(nn.Module):
    """The judge's body (``ddpm/judge.py``) as an image tower: conv blocks that each halve the
    image (28 -> 14 -> 7 -> 3 with three), then a linear layer and a ReLU. The judge's batch norm
    is group norm here (8 groups): it normalises each image by itself, so N processes
    train exactly as one holding the whole batch, and there are no running statistics.

    float B x 1 x 28 x 28 in [-1, 1] -> float B x width."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), width: int = 128):
        super().__init__()
        channels = [1, *channels]
        side = IMAGE_SIZE // 2 ** (len(channels) - 1)
        self.width = width
        blocks = (conv_block(a, b, norm=lambda c: nn.GroupNorm(min(8, c), c)) for a, b in zip(channels, channels[1:]))
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels[-1] * side * side, width), nn.ReLU())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


MODEL_CARD = """---
{{ card_data }}
---
A CLIP image tower trained by sdsteps against the locked text tower named in config.json
(conditioning/clip/towers.py). Load it with `LockedTextClip.from_pretrained(folder)`.
"""


class LockedTextClip(nn.Module, PyTorchModelHubMixin, model_card_template=MODEL_CARD):
    """The trained half of a CLIP with a locked text tower: the image tower, its projection, the
    text head and the logit scale. ``locked_text_tower`` names the sentence encoder whose pooled
    embeddings (float B x text_width) ``text_features`` takes."""

    def __init__(self, locked_text_tower: str, text_width: int, image_tower: str = "conv",
                 vision: dict | None = None, projection_dim: int = 384, text_head: str = "linear",
                 logit_scale_init: float = 1 / 0.07):
        super().__init__()
        self.locked_text_tower = locked_text_tower
        vision = vision or {}
        if image_tower == "conv":
            self.vision_model = ConvImageTower(**vision)
            width = self.vision_model.width
        else:
            config = CLIPVisionConfig(**{"num_channels": 1, "image_size": IMAGE_SIZE, "patch_size": 4, **vision})
            self.vision_model = CLIPVisionModel(config)
            width = config.hidden_size
        self.visual_projection = nn.Linear(width, projection_dim, bias=False)
        self.text_projection = None
        if text_head == "linear":
            self.text_projection = nn.Linear(text_width, projection_dim, bias=False)
            nn.init.eye_(self.text_projection.weight)  # starts as the locked tower's own space
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """float B x 1 x 28 x 28 in [-1, 1] -> float B x D, not normalised."""
        pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled if isinstance(pooled, torch.Tensor) else pooled.pooler_output)

    def text_features(self, sentence_embeds: torch.Tensor) -> torch.Tensor:
        """The locked tower's float B x text_width -> float B x D, not normalised."""
        return sentence_embeds if self.text_projection is None else self.text_projection(sentence_embeds)

    def forward(self, pixel_values: torch.Tensor, sentence_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings), each float B x D, unit length."""
        return (F.normalize(self.image_features(pixel_values), dim=-1),
                F.normalize(self.text_features(sentence_embeds), dim=-1))
