"""Inpainting: stage 3 conditioned on a mask and the masked image, as Stable Diffusion's inpainting model.

    python train.py configs/inpaint_fashion_quick.yaml
    python sample.py runs/inpaint_fashion_quick --init-image shirt.png --mask hole.png --prompt "a shirt"
    python sample.py runs/inpaint_fashion_quick --evaluate --n 1000  # vs the text run without training

The UNet reads 4 + 1 + 4 = 9 channels: the noisy latents, the mask on the latent grid (1 where
the picture is to be painted) and the latents of the masked image (the image with its masked
pixels set to grey, 0 in [-1, 1], encoded by the frozen autoencoder as a draw from its
posterior). A latent cell is 4 x 4 pixels, and every cell a masked pixel touches is painted
(``latent_cells``), so that no cell the mask channel calls known holds grey. Diffusers' pipeline
shrinks a mask by taking each cell's top-left pixel (nearest), which misses most cells of a 2-4 pixel
stroke and the first column of the padded left half; ``mark_cells`` masks that pixel of every
touched cell too, so the pipeline's shrinking gives the same grid. The picture keeps the known
pixels of a painted cell: its latents still say what is there.

Each training image gets a fresh mask from the step's seeded generator: a box, brush strokes, a
half of the image, or, for ``masks.full`` of them, everything, so the model stays a text-to-image
model too. The mask is drawn on the image as the model sees it, mirrored
with it, so mask and picture always agree (train them apart and the model learns to ignore the
mask).

What it is measured against: inpainting with the plain text run and no training at all,
which after every sampler step puts back the known region, noised to the step's level
(``inpaint_without_training``, what diffusers' inpainting pipeline does with a 4-channel UNet).
The trained model takes the same step too (``inpaint.keep_known``, ``put_back_known``): its
masked picture's latents say what the known region is, but the known cells it redraws from them
stray further from the picture than the autoencoder's own latents of it, and FD pays for that
under every kind of mask (README). Diffusers' pipeline takes that step only with a 4-channel
UNet: ``pipeline_callback`` adds it there, and keep_known false (``sample.py RUN inpaint.keep_known=false``)
gives the plain pipeline's pixels.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ddpm.contract import CLASS, PROMPT, Capabilities, SampleInput
from ddpm.data import IMAGE_SIZE, PAD, LabelledImages, read_image, to_model_space
from ddpm.diffusion import make_sampler, sample_loop
from ddpm.diffusion_stage import DiffusionStage
from ddpm.errors import UserError
from ddpm.evaluate import cached_judge
from ddpm.judge import accuracy
from ddpm.metrics import embed, frechet_distance, psnr, reference_stats
from latent.stage import Latents

from conditioning.finetune.start import FromTextRun
from conditioning.image.stage import ImageChannels, ImageConditionedConfig
from conditioning.text.stage import TextConditionedLDM

MASK_KINDS = ("boxes", "strokes", "halves", "full")


@dataclasses.dataclass
class MaskConfig:
    """The share of each kind of training mask (normalised to sum to 1)."""

    boxes: float = 0.3
    strokes: float = 0.3
    halves: float = 0.3  # the left, right, top or bottom half (at 0.1 the model lost to the baseline there)
    full: float = 0.1  # everything: plain text-to-image

    def __post_init__(self):
        shares = [getattr(self, k) for k in MASK_KINDS]
        if min(shares) < 0 or sum(shares) <= 0:
            raise UserError(f"masks: shares must be >= 0 and not all 0, got {dict(zip(MASK_KINDS, shares))}")


@dataclasses.dataclass
class InpaintConfig:
    # after every sampler step put the known latent cells back, noised to the step's level, as the
    # baseline does; diffusers' pipeline does it only for a 4-channel UNet (false: its pixels exactly)
    keep_known: bool = True


@dataclasses.dataclass
class InpaintDDPMConfig(ImageConditionedConfig):
    masks: MaskConfig = dataclasses.field(default_factory=MaskConfig)
    inpaint: InpaintConfig = dataclasses.field(default_factory=InpaintConfig)


# -- masks: bool B x 28 x 28, True where the picture is to be painted -------------------------------

def _grid(device) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE, device=device), torch.arange(IMAGE_SIZE, device=device),
                            indexing="ij")
    return ys.float() + 0.5, xs.float() + 0.5


def box_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """A rectangle 7..20 pixels on a side, anywhere in the image."""
    d = generator.device
    size = torch.randint(7, 21, (n, 2), generator=generator, device=d)
    corner = (torch.rand(n, 2, generator=generator, device=d) * (IMAGE_SIZE - size + 1)).floor()
    ys, xs = _grid(d)
    inside_y = (ys >= corner[:, :1, None]) & (ys < corner[:, :1, None] + size[:, :1, None])
    inside_x = (xs >= corner[:, 1:, None]) & (xs < corner[:, 1:, None] + size[:, 1:, None])
    return inside_y & inside_x


def stroke_masks(n: int, generator: torch.Generator, segments: int = 4) -> torch.Tensor:
    """A brush stroke: a random walk of ``segments`` straight lines, 5..10 pixels each, 2..4 pixels wide."""
    d = generator.device
    start = 4 + torch.rand(n, 1, 2, generator=generator, device=d) * (IMAGE_SIZE - 8)
    angle = torch.rand(n, segments, generator=generator, device=d) * 2 * torch.pi
    length = 5 + 5 * torch.rand(n, segments, generator=generator, device=d)
    radius = 1 + torch.rand(n, 1, 1, generator=generator, device=d)
    steps = torch.stack([angle.sin(), angle.cos()], dim=-1) * length[..., None]
    points = torch.cat([start, start + steps.cumsum(1)], dim=1).clamp(0, IMAGE_SIZE)  # n x (segments + 1) x 2
    a, b = points[:, :-1, None, None, :], points[:, 1:, None, None, :]  # n x S x 1 x 1 x 2
    ys, xs = _grid(d)
    p = torch.stack([ys, xs], dim=-1)  # 28 x 28 x 2
    ab = b - a
    along = (((p - a) * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    distance = (p - (a + along[..., None] * ab)).norm(dim=-1)  # n x S x 28 x 28
    return (distance.amin(1) <= radius)


def half_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """The left, right, top or bottom half."""
    which = torch.randint(0, 4, (n,), generator=generator, device=generator.device)
    sides = torch.stack([fixed_masks(side, 1, generator.device)[0] for side in ("left", "right", "top", "bottom")])
    return sides[which]


def fixed_masks(name: str, n: int, device="cpu") -> torch.Tensor:
    """n copies of the ``left``, ``right``, ``top`` or ``bottom`` half, or ``full``."""
    ys, xs = _grid(device)
    half = IMAGE_SIZE / 2
    mask = {"left": xs < half, "right": xs >= half, "top": ys < half, "bottom": ys >= half,
            "full": torch.ones_like(xs, dtype=torch.bool)}[name]
    return mask.expand(n, -1, -1)


def draw_masks(n: int, shares: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """bool n x 28 x 28: for each image a mask of a kind drawn with ``shares``."""
    p = torch.tensor([getattr(shares, k) for k in MASK_KINDS], device=generator.device)
    kind = torch.multinomial(p / p.sum(), n, replacement=True, generator=generator)
    candidates = torch.stack([box_masks(n, generator), stroke_masks(n, generator), half_masks(n, generator),
                              fixed_masks("full", n, generator.device)])
    return candidates[kind, torch.arange(n, device=generator.device)]


def read_mask(path: str) -> torch.Tensor:
    """A 28 x 28 grayscale PNG -> bool 1 x 28 x 28, True (white) where to paint; neither all black nor
    all white."""
    mask = read_image(path, "--mask", sizes=(IMAGE_SIZE,), modes=("1", "L")) >= 128
    if not mask.any():
        raise UserError(f"--mask {path} is all black: nothing to paint (white marks where to paint)")
    if mask.all():
        raise UserError(f"--mask {path} is all white: nothing of the picture is kept; for a new picture "
                        f"sample from a prompt alone")
    return mask


def padded(masks: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """bool B x 28 x 28 -> float B x 1 x 32 x 32 in {0, 1}, the padding known (0), mirrored where ``flip``."""
    m = masks.float()[:, None]
    if flip is not None:
        m = torch.where(flip[:, None, None, None], m.flip(-1), m)
    return F.pad(m, (PAD, PAD, PAD, PAD), value=0.0)


def latent_cells(masks: torch.Tensor, size: int) -> torch.Tensor:
    """float B x 1 x 32 x 32 in {0, 1} -> B x 1 x size x size: 1 where any pixel of the cell is masked."""
    return F.max_pool2d(masks, masks.shape[-1] // size)


def mark_cells(masks: torch.Tensor, size: int) -> torch.Tensor:
    """float B x 1 x 32 x 32 in {0, 1} -> the same with the top-left pixel of every latent cell (of a
    size x size grid) that a masked pixel touches masked too. Diffusers shrinks a mask to the grid by
    taking each cell's top-left pixel (nearest), so the marked mask shrinks to ``latent_cells`` there,
    while the picture is greyed where the mask is (and at those corners), not over whole cells."""
    cell = masks.shape[-1] // size
    corners = torch.zeros_like(masks)
    corners[..., ::cell, ::cell] = latent_cells(masks, size)
    return torch.maximum(masks, corners)


def masked(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B x 1 x 32 x 32) with the masked pixels grey (0), as diffusers masks them."""
    return x * (masks < 0.5)


class MaskedImage(ImageChannels):
    """A prompt, a mask and the masked picture's latents."""

    pipeline_class = "StableDiffusionInpaintPipeline"

    @property
    def extra_channels(self) -> int:
        return 1 + self.stage.space.sample_shape[0]  # the mask, and the masked image's latents

    def pipeline_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """bool B x 28 x 28 -> float B x 1 x 32 x 32: the mask as the model takes it, padded, its
        cells marked; as ``mask_image``, ``StableDiffusionInpaintPipeline`` paints what we paint."""
        return mark_cells(padded(masks), self.stage.space.sample_shape[-1])

    def network_image(self, x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """concat: the mask on the latent grid and the masked image's latents, B x (1 + C) x 8 x 8,
        from images in [-1, 1] and masks (float B x 1 x 32 x 32), their cells marked here."""
        masks = mark_cells(masks, self.stage.space.sample_shape[-1])
        latents = self.stage.space.measured_latent_space().sample_latents(masked(x, masks), generator)
        on_grid = F.interpolate(masks, size=self.stage.space.sample_shape[1:])  # as the pipeline samples it (nearest)
        return torch.cat([on_grid.to(latents.device), latents], dim=1)

    def image_condition(self, raw, flip, generator) -> dict[str, torch.Tensor]:
        masks = padded(draw_masks(len(raw["images"]), self.config.masks, generator), flip)
        return {"concat": self.network_image(to_model_space(raw["images"], flip), masks.to(raw["images"].device),
                                             generator)}

    # -- sampling --------------------------------------------------------------------------

    def input_condition(self, inputs, n) -> dict[str, torch.Tensor]:
        """inputs: ``image`` (uint8 N x 28 x 28) and ``mask`` (bool N x 28 x 28, True: paint here)."""
        image, mask = self.require(inputs, "image", "mask")
        return {"image": to_model_space(image).expand(n, -1, -1, -1), "mask": padded(mask).expand(n, -1, -1, -1)}

    def sampling_inputs(self, condition, null, init_images, generator):
        """As ``StableDiffusionInpaintPipeline``: first the latents' noise, then the masked image's latents."""
        noise, init, _, _ = super().sampling_inputs(condition, null, init_images, generator)
        network = {"concat": self.network_image(condition["image"], condition["mask"], generator).to(noise.device)}
        return noise, init, *self.with_network_inputs(condition, null, ("image", "mask"), network)

    def after_step(self, condition, noise, sampler):
        """With ``inpaint.keep_known``, the known region put back after every step (``put_back_known``)."""
        if not self.config.inpaint.keep_known:
            return None
        space = self.stage.space.measured_latent_space()
        known, paint = known_region(space, condition["image"], condition["mask"], noise)
        return put_back_known(sampler, noise, known, paint)

    def pipeline_callback(self, images: torch.Tensor, masks: torch.Tensor, noise: torch.Tensor):
        """``inpaint.keep_known`` for ``StableDiffusionInpaintPipeline``, which puts the known region back
        only for a 4-channel UNet: its ``callback_on_step_end``. images uint8 N x 28 x 28, masks bool
        N x 28 x 28, noise the pipeline's starting latents (its generator's first draw, N x C x h x w)."""
        space = self.stage.space.measured_latent_space()
        known, paint = known_region(space, to_model_space(images), padded(masks), noise)

        def callback(pipe, i, t, tensors):
            timesteps = pipe.scheduler.timesteps
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            return {"latents": put_back_known(pipe.scheduler, noise, known, paint)(t_next, tensors["latents"])}

        return callback

    def inputs_from(self, images, masks: torch.Tensor | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A real image, and a mask drawn like the training masks (seeded) unless given."""
        if masks is None:
            masks = draw_masks(len(images), self.config.masks, torch.Generator().manual_seed(seed))
        return {"image": images, "mask": masks}

    def shown_inputs(self, inputs) -> torch.Tensor:
        """The picture as the model sees it: grey where it is masked (and at the marked cells' corners)."""
        painted = self.pipeline_mask(inputs["mask"])[:, 0, PAD : PAD + IMAGE_SIZE, PAD : PAD + IMAGE_SIZE] > 0.5
        return torch.where(painted, 128, inputs["image"]).to(torch.uint8)


class InpaintingLDM(DiffusionStage):
    """A prompt, a mask and the masked picture in the latents' space, started from a text run."""

    name = "inpaint"
    Config = InpaintDDPMConfig
    capabilities = Capabilities(conditions=(CLASS, PROMPT), generates=True, evaluates=True, inputs=(
        SampleInput("mask", "28 x 28, white where the --init-image is to be painted", read_mask,
                    with_init_image=True),))
    Space, Condition, model_class = Latents, MaskedImage, UNet2DConditionModel
    recipes = (FromTextRun(),)
    report_table = staticmethod(ImageChannels.report_table)

    # -- measured --------------------------------------------------------------------------

    def evaluate(self, model, n: int, **settings) -> dict[str, float]:
        """For each mask kind (boxes, strokes, the left or right half; n class-balanced test images
        with their class prompts): PSNR outside the mask against the real image (the autoencoder's
        own round trip is the ceiling), judge accuracy and FD of the filled images; for this model
        and, with ``init_from``, inpainting by that text run without training."""
        images, labels = self.condition.test_examples(n)
        baseline = self.condition.text_run(next(model.parameters()).device)
        kinds = evaluation_masks(n)
        judge = cached_judge()
        reference = reference_stats(judge)
        roundtrip = self.space.measured_latent_space().reconstruct(images)
        report = {}
        for kind, masks in kinds.items():
            known = ~masks
            report[f"eval_psnr_known/{kind}: autoencoder round trip"] = psnr(roundtrip, images, known).mean().item()
            methods = {"ours": lambda: self.generate(model, labels, inputs={"image": images, "mask": masks},
                                                     progress=True, **settings)}
            if baseline is not None:
                methods["without training"] = lambda: inpaint_without_training(*baseline, images, masks, labels,
                                                                               progress=True, **settings)
            for method, make in methods.items():
                out = make()
                feats, _ = embed(judge, out)
                report[f"eval_psnr_known/{kind}: {method}"] = psnr(out, images, known).mean().item()
                report[f"eval_judge_accuracy/{kind}: {method}"] = accuracy(judge, LabelledImages(out, labels))
                report[f"eval_fd/{kind}: {method}"] = frechet_distance(feats, reference.features)
        return report


def evaluation_masks(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The masks ``evaluate`` paints, bool n x 28 x 28 of each kind: boxes, strokes, and the left
    half of every other image and the right half of the rest."""
    generator = torch.Generator().manual_seed(seed)
    return {"boxes": box_masks(n, generator), "strokes": stroke_masks(n, generator),
            "halves": torch.where(torch.arange(n)[:, None, None] % 2 == 0, fixed_masks("left", n),
                                  fixed_masks("right", n))}


@torch.no_grad()
def inpaint_without_training(stage: TextConditionedLDM, model, images: torch.Tensor, masks: torch.Tensor,
                             labels: torch.Tensor, *, guidance: float | None = None, scheduler: str | None = None,
                             steps: int | None = None, seed: int = 0, batch_size: int = 500,
                             progress: bool = False) -> torch.Tensor:
    """Inpainting with a plain text run (4-channel UNet): sample with each image's class prompt and
    after every step replace the latents outside the mask by the known image's, noised to the
    next step's level (the mask on the latent grid covers every cell a masked pixel touches, as the
    trained model's does).
    uint8 N x 28 x 28."""
    settings = stage.sampling_settings(guidance=guidance, scheduler=scheduler, steps=steps)
    guidance, steps = settings["guidance"], settings["steps"]
    device = next(model.parameters()).device
    space = stage.space.measured_latent_space().to(device)
    out = []
    for i, index in enumerate(torch.arange(len(images)).split(batch_size)):
        condition = stage.condition.class_condition(labels[index])
        null = stage.condition.null_condition(condition)
        condition, null = ({k: v.to(device) for k, v in c.items()} for c in (condition, null))
        generator = torch.Generator(device).manual_seed(seed + i)
        noise = torch.randn((len(index), *stage.space.sample_shape), generator=generator, device=device)
        known, paint = known_region(space, to_model_space(images[index].to(device)), padded(masks[index].to(device)),
                                    noise)
        sampler = make_sampler(settings["scheduler"], stage.diffusion)
        z = sample_loop(lambda z, t: stage.predict(model, z, t, condition, null, guidance), sampler, noise, steps,
                        generator, progress=progress, after_step=put_back_known(sampler, noise, known, paint))
        out.append(stage.space.to_images(z).cpu())
    return torch.cat(out)


def known_region(space, image: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """What inpainting puts back, for the trained model and the baseline alike: from the picture
    (float B x 1 x 32 x 32 in [-1, 1]) and its padded mask (``padded``), the picture's latents, the
    posterior mean (B x C x h x w, like ``noise``), and the painted cells (B x 1 x h x w in {0, 1})."""
    known = space.sample_latents(image, None).to(noise.device)
    return known, latent_cells(mask.to(noise.device), noise.shape[-1])


def put_back_known(sampler, noise: torch.Tensor, known: torch.Tensor, paint: torch.Tensor):
    """``sample_loop``'s after_step for inpainting: outside the painted cells (``paint``, B x 1 x h x w
    in {0, 1}) the sample becomes the known image's latents (``known``, B x C x h x w), noised with
    the starting ``noise`` to the level the sample is now at, and clean after the last step."""
    def put_back(t_next: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        target = known if t_next is None else sampler.add_noise(known, noise, t_next.repeat(len(z)))
        return paint * z + (1 - paint) * target

    return put_back
