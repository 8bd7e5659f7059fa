"""Structure-to-image: stage 3 conditioned on an edge map, as Stable Diffusion's depth-to-image model.

    python train.py configs/structure_fashion_quick.yaml
    python sample.py runs/structure_fashion_quick --structure shirt.png --prompt "a dress" --prompt "a coat"
    python sample.py runs/structure_fashion_quick --evaluate --n 1000   # edge F1 and judge, vs the text run

Fashion-MNIST has no depth, so the structure of a garment is its edge map: the Sobel gradient
magnitude of the padded image (``structure_maps``). Like SD's depth map it is shrunk to the
latent grid (bicubic, 8 x 8), scaled to [-1, 1] per image by its own minimum and maximum, and
concatenated to the noisy latents as one channel. The scaling divides by max - min, which a
blank image makes 0: ours floors it (``MIN_RANGE``), where diffusers' depth pipeline would give
NaN. The same map with different prompts gives different garments of one shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ddpm.contract import CLASS, PROMPT, Capabilities, SampleInput
from ddpm.data import LabelledImages, read_image, to_model_space
from ddpm.evaluate import cached_judge
from ddpm.diffusion_stage import DiffusionStage
from ddpm.judge import accuracy
from latent.stage import Latents

from conditioning.finetune.start import FromTextRun
from conditioning.image.stage import ImageChannels, ImageConditionedConfig

MIN_RANGE = 1e-2  # the floor of a map's max - min when it is scaled to [-1, 1]
SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
EDGE = 0.1  # a pixel is an edge pixel where the map (of a 0..1 image) is at least this


def structure_maps(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B x 28 x 28 -> float B x 32 x 32: the Sobel gradient magnitude of the padded image on a
    0..1 scale (mirrored where ``flip``)."""
    x = (to_model_space(images, flip) + 1) / 2
    kernels = torch.stack([SOBEL, SOBEL.T])[:, None].to(x.device)  # d/dx and d/dy, 2 x 1 x 3 x 3
    gradient = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradient.norm(dim=1)


def to_latent_grid(maps: torch.Tensor, size: int) -> torch.Tensor:
    """float B x 32 x 32 -> B x 1 x size x size in [-1, 1], as ``StableDiffusionDepth2ImgPipeline``
    prepares a depth map (bicubic, then each map's min -> -1 and max -> 1), with a floor on max - min."""
    small = F.interpolate(maps[:, None].float(), size=(size, size), mode="bicubic", align_corners=False)
    lo, hi = small.amin((1, 2, 3), keepdim=True), small.amax((1, 2, 3), keepdim=True)
    return 2 * (small - lo) / (hi - lo).clamp_min(MIN_RANGE) - 1


def edge_f1(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per image, F1 of the output's edge pixels against the input's (uint8 N x 28 x 28 each)."""
    a, b = structure_maps(out) >= EDGE, structure_maps(images) >= EDGE
    both = (a & b).sum((1, 2)).float()
    return 2 * both / (a.sum((1, 2)) + b.sum((1, 2))).clamp_min(1)


class EdgeMap(ImageChannels):
    """A prompt and an edge map of the garment."""

    pipeline_class = "StableDiffusionDepth2ImgPipeline"
    extra_channels = 1

    def image_condition(self, raw, flip, generator) -> dict[str, torch.Tensor]:
        """concat: each image's structure map on the latent grid."""
        return {"concat": to_latent_grid(structure_maps(raw["images"], flip), self.stage.space.sample_shape[-1])}

    def input_condition(self, inputs, n) -> dict[str, torch.Tensor]:
        """inputs: ``structure``, float N x 32 x 32 maps (``structure_maps`` of the images to follow)."""
        (maps,) = self.require(inputs, "structure")
        return {"concat": to_latent_grid(maps, self.stage.space.sample_shape[-1]).expand(n, -1, -1, -1)}

    def sampling_inputs(self, condition, null, init_images, generator):
        """As ``StableDiffusionDepth2ImgPipeline`` for img2img: first the image's latents (a posterior
        draw), then the noise."""
        if init_images is None:
            return super().sampling_inputs(condition, null, None, generator)
        init = self.stage.space.measured_latent_space().sample_latents(to_model_space(init_images), generator)
        noise, _, condition, null = super().sampling_inputs(condition, null, None, generator)
        return noise, init, condition, null

    def inputs_from(self, images, **options) -> dict[str, torch.Tensor]:
        return {"structure": structure_maps(images)}

    def shown_inputs(self, inputs) -> torch.Tensor:
        maps = inputs["structure"]
        return (maps / maps.amax((1, 2), keepdim=True).clamp_min(MIN_RANGE) * 255)[:, 2:30, 2:30].to(torch.uint8)

    def pipeline_extras(self) -> dict:
        return {"depth_estimator": [None, None], "feature_extractor": [None, None]}


class StructureLDM(DiffusionStage):
    """A prompt and an edge map in the latents' space, started from a text run."""

    name = "structure"
    Config = ImageConditionedConfig
    capabilities = Capabilities(conditions=(CLASS, PROMPT), generates=True, evaluates=True, inputs=(
        SampleInput("structure", "make garments with this image's edges",
                    lambda path: structure_maps(read_image(path, "--structure"))),))
    Space, Condition, model_class = Latents, EdgeMap, UNet2DConditionModel
    recipes = (FromTextRun(),)
    report_table = staticmethod(ImageChannels.report_table)

    def evaluate(self, model, n: int, **settings) -> dict[str, float]:
        """On n class-balanced test images: the edge F1 of the output against the input's map, and the
        judge's accuracy for the prompted class, prompting each image's own class and the next class
        (a shirt's shape asked to be a pullover); the same for the ``init_from`` text run (the prompts
        alone), and the F1 of a second real image of the same class."""
        images, labels = self.condition.test_examples(n)
        baseline = self.condition.text_run(next(model.parameters()).device)
        others, _ = self.condition.test_examples(n, seed=1)
        judge = cached_judge()
        inputs = self.condition.inputs_from(images)
        report = {"eval_edge_f1/another real image of the class": edge_f1(others, images).mean().item()}
        for asked, prompted in (("own class", labels), ("next class", (labels + 1) % len(self.class_names))):
            runs = {"ours": lambda: self.generate(model, prompted, inputs=inputs, progress=True, **settings)}
            if baseline is not None:
                stage, base = baseline
                runs["text run, no structure"] = lambda: stage.generate(base, prompted, progress=True, **settings)
            for method, make in runs.items():
                out = make()
                report[f"eval_edge_f1/{method}, {asked}"] = edge_f1(out, images).mean().item()
                report[f"eval_judge_accuracy/{method}, {asked}"] = accuracy(judge, LabelledImages(out, prompted))
        return report
