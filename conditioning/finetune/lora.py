"""LoRA: fine-tune a few low-rank adapters instead of the whole UNet (Hu et al. 2021).

Each adapted linear layer W (d_out x d_in) of the UNet's attention (``to_q``, ``to_k``,
``to_v``, ``to_out.0``) keeps its weights frozen and gains a trainable detour

    W x  ->  W x + (alpha / r) * B (A x),      A: r x d_in (Gaussian), B: d_out x r (zeros)

so at the start the adapted UNet computes exactly what the original did. ``peft`` builds the
adapters; what is saved is only A and B, in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora.down/up.weight``), which
``StableDiffusionPipeline.load_lora_weights(folder)`` and ``load_lora`` below read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ddpm.diffusion_stage import Recipe
from ddpm.errors import UserError

from conditioning.finetune.start import load_checkpoint, starting_model

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' loaders look for


@dataclasses.dataclass
class LoraSettings:
    """The ``lora`` section of a fine-tuning config."""

    rank: int = 0  # r; 0: no adapters, fine-tune the whole UNet
    alpha: float | None = None  # the adapters' scale is alpha / rank; default: alpha = rank (scale 1)
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self):
        if self.rank < 0:
            raise UserError(f"lora.rank must be >= 0 (0: fine-tune the whole UNet), got {self.rank}")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty; e.g. [to_q, to_k, to_v, to_out.0]")


def add_lora(unet, settings: LoraSettings):
    """Freeze ``unet`` and give it trainable adapters (B = 0: it still computes what it did)."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank,
                                init_lora_weights="gaussian", target_modules=list(settings.target_modules)))
    return unet


def save_lora(unet, folder: Path) -> Path:
    """The adapters alone, in diffusers' LoRA format: ``folder/pytorch_lora_weights.safetensors``."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    config = unet.peft_config["default"]
    metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)
    return folder / WEIGHTS_NAME


def load_lora(unet, folder: str | Path):
    """Adapters saved by ``save_lora`` (or any diffusers LoRA folder for this UNet) into ``unet``."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"{folder} holds no LoRA ({WEIGHTS_NAME}); give the final/ folder of a LoRA fine-tune")
    try:
        unet.load_lora_adapter(folder, prefix="unet", weight_name=WEIGHTS_NAME, use_safetensors=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"the LoRA in {folder} does not fit this UNet (was it trained from another run?): "
                        f"{str(e).splitlines()[0]}") from None
    return unet


class Lora(Recipe):
    """With ``lora.rank`` > 0, rank-r adapters on the starting UNet train instead of all its weights, and
    are saved alone; the run's model is then the starting UNet with its adapters."""

    def build_model(self, stage, then):
        model = then()
        return add_lora(model, stage.config.lora) if stage.config.lora.rank else model

    def save_final(self, stage, then, model, folder: Path) -> None:
        if not stage.config.lora.rank:
            return then(model, folder)
        folder.mkdir(parents=True)
        save_lora(model, folder)

    def load_model(self, stage, then, folder: Path):
        if not stage.config.lora.rank:
            return then(folder)
        if (folder / "ema").is_dir():
            return load_checkpoint(stage, folder)
        return stage.add_adapters(starting_model(stage), folder)
