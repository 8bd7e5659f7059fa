"""Stage 1: a class-conditioned UNet denoising Fashion-MNIST pixels.

    python train.py configs/ddpm_fashion_quick.yaml
    python sample.py runs/ddpm_fashion_quick --class "ankle boot"

Everything a diffusion stage does is in ``ddpm/diffusion_stage.py``; this file says what
stage 1 is: a ``UNet2DModel`` on the padded 1 x 32 x 32 pixels (the default space, ``Pixels``),
conditioned on the class label (``ClassLabel``) through the UNet's class embedding (added to the
timestep embedding), with one extra label, ``null_label`` = 10, meaning "no class": the null
condition of classifier-free guidance.

Stage 2 (``latent/stage.py``) is the same condition in another space, autoencoder latents;
stage 3 (``conditioning/text/stage.py``) is a prompt in that space.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import UNet2DModel

from .config import check_model_keys
from .contract import CLASS, Capabilities
from .data import SOURCES, DataConfig
from .diffusion_stage import Condition, DiffusionConfig, DiffusionStage, NetworkInputs, SampleConfig
from .errors import UserError


@dataclasses.dataclass
class DDPMConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict = dataclasses.field(default_factory=dict)  # keyword arguments of UNet2DModel
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def __post_init__(self):
        check_model_keys(self.model, UNet2DModel, ("sample_size", "in_channels", "out_channels", "num_class_embeds"))


class ClassLabel(Condition):
    """The class label, through the UNet's class embedding; ``null_label`` = 10 means "no class"."""

    def __init__(self, stage):
        super().__init__(stage)
        self.null_label = len(stage.class_names)  # the extra class embedding: "no class", for CFG

    def network_args(self) -> dict:
        return {"num_class_embeds": len(self.stage.class_names) + 1}

    def batch_entries(self, raw, dropped, flip, generator) -> dict[str, torch.Tensor]:
        """labels (int64 B), the null label where dropped."""
        return {"labels": torch.where(dropped, self.null_label, raw["labels"])}

    def model_condition(self, batch) -> NetworkInputs:
        return {"class_labels": batch["labels"]}

    def class_condition(self, labels: torch.Tensor, phrasings: str = "train") -> NetworkInputs:
        if phrasings != "train":
            raise UserError(f"phrasings are for prompt-conditioned runs; a '{self.stage.name}' run is asked for "
                            f"class labels directly")
        return {"class_labels": labels}

    def null_condition(self, condition: NetworkInputs, negative_prompt: str = "") -> NetworkInputs:
        if negative_prompt:
            raise UserError(f"a negative prompt needs a prompt-conditioned run; a '{self.stage.name}' run has "
                            f"only class labels")
        return {"class_labels": torch.full_like(condition["class_labels"], self.null_label)}


class ClassConditionedDDPM(DiffusionStage):
    """Pixels, conditioned on the class label."""

    name = "ddpm"
    Config = DDPMConfig
    data_sources = SOURCES
    capabilities = Capabilities(conditions=(CLASS,), generates=True, evaluates=True)
    Condition = ClassLabel
    model_class = UNet2DModel
