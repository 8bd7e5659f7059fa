"""Super-resolution: stage 3 conditioned on a low-resolution image, as Stable Diffusion's x4 upscaler.

    python train.py configs/upscale_fashion_quick.yaml
    python sample.py runs/upscale_fashion_quick --low-res small.png --prompt "a sneaker"
    python sample.py runs/upscale_fashion_quick upscale.noise_level=100 --low-res small.png --prompt "a sneaker"
    python sample.py runs/upscale_fashion_quick --evaluate --n 1000     # PSNR, SSIM, judge: bicubic vs ours

The low-resolution image is 8 x 8, the autoencoder's latent grid (the padded 32 x 32 image
averaged over 4 x 4 blocks), so it is concatenated to the 4 x 8 x 8 noisy latents as a fifth
channel: x4 in each direction, like SD's upscaler. Training pairs each image with its own
low-resolution copy, *noised* to a random level 0..``max_noise_level`` of a second, fixed
noise schedule (the ``low_res_scheduler``); the level is the UNet's class label. So the model
learns not to trust the input's fine detail (a real small image is never exactly the average
of the large one), and at sampling time ``upscale.noise_level`` chooses how much to trust it: 0 keeps
closest to the input, larger levels let the model invent more.

diffusers' ``StableDiffusionUpscalePipeline`` sets every VAE's ``scaling_factor`` to 0.08333.
Ours is measured from data (``latent/cache.py``), so ``final/vae`` is our autoencoder with our
normalisation folded into its weights (``LatentSpace.folded``): the pipeline's 0.08333 then
gives exactly our latents.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from ddpm.contract import CLASS, PROMPT, Capabilities, SampleInput
from ddpm.data import IMAGE_SIZE, PADDED_SIZE, LabelledImages, read_image, to_model_space, to_pixels
from ddpm.errors import UserError
from ddpm.evaluate import cached_judge
from ddpm.judge import accuracy
from ddpm.metrics import psnr, ssim
from ddpm.diffusion_stage import DiffusionStage
from latent.stage import Latents

from conditioning.finetune.start import FromTextRun
from conditioning.image.stage import ImageChannels, ImageConditionedConfig

LOW_RES = 8  # pixels per side of the low-resolution image: the latent grid of the 32 x 32 image
PIPELINE_SCALING_FACTOR = 0.08333  # what StableDiffusionUpscalePipeline sets every VAE's factor to


@dataclasses.dataclass
class UpscaleConfig:
    max_noise_level: int = 350  # training noises the low-res image to a level in 0..this (SD's upscaler: 350)
    noise_level: int = 20  # the level sample.py uses (the pipeline's default); sample.py RUN upscale.noise_level=N

    def __post_init__(self):
        if not 0 <= self.noise_level <= self.max_noise_level < 1000:
            raise UserError(f"upscale needs 0 <= noise_level <= max_noise_level < 1000, got {self.noise_level} "
                            f"and {self.max_noise_level}")


@dataclasses.dataclass
class UpscaleDDPMConfig(ImageConditionedConfig):
    upscale: UpscaleConfig = dataclasses.field(default_factory=UpscaleConfig)


def low_res_of(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B x 28 x 28 -> float B x 1 x 8 x 8 in [-1, 1]: the padded image's 4 x 4 block means."""
    return F.avg_pool2d(to_model_space(images, flip), PADDED_SIZE // LOW_RES)


def bicubic(low_res: torch.Tensor) -> torch.Tensor:
    """float B x 1 x 8 x 8 -> uint8 B x 28 x 28, upscaled by bicubic interpolation: the baseline."""
    return to_pixels(F.interpolate(low_res.float(), size=PADDED_SIZE, mode="bicubic", align_corners=False))


def shown(low_res: torch.Tensor) -> torch.Tensor:
    """float B x 1 x 8 x 8 -> uint8 B x 28 x 28 with each low-res pixel a 4 x 4 block, to look at."""
    return to_pixels(F.interpolate(low_res.float(), size=PADDED_SIZE, mode="nearest"))


def read_low_res(path: str) -> torch.Tensor:
    """An 8 x 8 PNG as float 1 x 1 x 8 x 8 in [-1, 1]; a 28 x 28 one shrunk as training shrinks it."""
    image = read_image(path, "--low-res", sizes=(LOW_RES, IMAGE_SIZE))
    return image[None].float() / 127.5 - 1 if image.shape[-1] == LOW_RES else low_res_of(image)


LOW_RES_INPUT = SampleInput("low_res", "the 8 x 8 image to upscale (a 28 x 28 one is shrunk first); "
                            "upscale.noise_level=N: how much of its detail to trust", read_low_res)


class LowResolution(ImageChannels):
    """A prompt and the low-resolution image, noised to a level that is the UNet's class label."""

    pipeline_class = "StableDiffusionUpscalePipeline"
    extra_channels = 1

    def __init__(self, stage):
        super().__init__(stage)
        self.low_res_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")  # SD upscaler's

    def network_args(self) -> dict:
        """The noise level is a class label: one embedding per level 0..max_noise_level."""
        return {**super().network_args(), "num_class_embeds": self.config.upscale.max_noise_level + 1}

    def noised(self, low_res: torch.Tensor, levels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The low-res images (B x 1 x 8 x 8) noised to ``levels`` (int64 B) of the low-res schedule."""
        noise = torch.randn(low_res.shape, generator=generator, device=generator.device).to(low_res.device)
        return self.low_res_scheduler.add_noise(low_res, noise, levels)

    def image_condition(self, raw, flip, generator) -> dict[str, torch.Tensor]:
        """concat: each image's low-res copy noised to a random level; class_labels: the level."""
        low = low_res_of(raw["images"], flip)
        levels = torch.randint(0, self.config.upscale.max_noise_level + 1, (len(low),), generator=generator,
                               device=generator.device).to(low.device)
        return {"concat": self.noised(low, levels, generator), "class_labels": levels}

    # -- sampling --------------------------------------------------------------------------

    def input_condition(self, inputs, n) -> dict[str, torch.Tensor]:
        """inputs: ``low_res`` (float N x 1 x 8 x 8 in [-1, 1]) and optionally ``noise_level`` (an int)."""
        (low,) = self.require(inputs, "low_res")
        level = inputs.get("noise_level")
        level = self.config.upscale.noise_level if level is None else level
        if not 0 <= level <= self.config.upscale.max_noise_level:
            raise UserError(f"the noise level must be in 0..{self.config.upscale.max_noise_level} (this run's "
                            f"upscale.max_noise_level), got {level}")
        if tuple(low.shape[1:]) != (1, LOW_RES, LOW_RES):
            raise UserError(f"the low-resolution image must be {LOW_RES} x {LOW_RES}, got {list(low.shape[2:])}")
        return {"low_res": low.expand(n, -1, -1, -1), "noise_level": torch.full((n,), level)}

    def sampling_inputs(self, condition, null, init_images, generator):
        """As ``StableDiffusionUpscalePipeline``: first the low-res image's noise, then the latents'."""
        level = condition["noise_level"]
        low = self.noised(condition["low_res"].to(generator.device), level.to(generator.device), generator)
        noise, init, _, _ = super().sampling_inputs(condition, null, init_images, generator)
        network = {"concat": low, "class_labels": level.to(low.device)}
        return noise, init, *self.with_network_inputs(condition, null, ("low_res", "noise_level"), network)

    def inputs_from(self, images, **options) -> dict[str, torch.Tensor]:
        return {"low_res": low_res_of(images), **options}

    def shown_inputs(self, inputs) -> torch.Tensor:
        return shown(inputs["low_res"])

    def baselines(self, inputs) -> dict[str, torch.Tensor]:
        return {"bicubic": bicubic(inputs["low_res"])}

    # -- saving ----------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """A ``StableDiffusionUpscalePipeline`` folder: stage 3's, with ``low_res_scheduler/`` and the
        autoencoder's normalisation folded in for the pipeline's scaling factor."""
        super().save(folder)
        self.stage.space.latent_space().folded(PIPELINE_SCALING_FACTOR).save_pretrained(folder / "vae")
        self.low_res_scheduler.save_pretrained(folder / "low_res_scheduler")

    def pipeline_extras(self) -> dict:
        return {"low_res_scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
                "watermarker": [None, None], "feature_extractor": [None, None],
                "max_noise_level": self.config.upscale.max_noise_level}


class SuperResolutionLDM(DiffusionStage):
    """A prompt and a low-resolution image in the latents' space, started from a text run."""

    name = "upscale"
    Config = UpscaleDDPMConfig
    capabilities = Capabilities(conditions=(CLASS, PROMPT), inputs=(LOW_RES_INPUT,), generates=True,
                                evaluates=True)
    Space, Condition, model_class = Latents, LowResolution, UNet2DConditionModel
    recipes = (FromTextRun(),)
    report_table = staticmethod(ImageChannels.report_table)

    # -- measured --------------------------------------------------------------------------

    def evaluate(self, model, n: int, noise_level: int | None = None, **settings) -> dict[str, float]:
        """On n class-balanced test images, upscaled from their 8 x 8 copies with their class prompt
        (at ``noise_level``, default ``upscale.noise_level``):
        PSNR and SSIM against the real image, the judge's accuracy, and the consistency error (RMS,
        in grey levels) of the output's own 8 x 8 copy against the input; bicubic upscaling, ours,
        the autoencoder's round trip of the real image (a latent model's ceiling) and the real image."""
        images, labels = self.condition.test_examples(n)
        low = low_res_of(images)
        outputs = {"bicubic": bicubic(low),
                   "ours": self.generate(model, labels, inputs={"low_res": low, "noise_level": noise_level},
                                         progress=True, **settings),
                   "autoencoder round trip": self.space.measured_latent_space().reconstruct(images),
                   "real": images}
        judge = cached_judge()
        report = {}
        for method, out in outputs.items():
            if method != "real":
                report[f"eval_psnr/{method}"] = psnr(out, images).mean().item()
                report[f"eval_ssim/{method}"] = ssim(out, images)
                error = (low_res_of(out) - low) * 127.5
                report[f"eval_consistency_rms/{method}"] = error.pow(2).mean().sqrt().item()
            report[f"eval_judge_accuracy/{method}"] = accuracy(judge, LabelledImages(out, labels))
        return report
