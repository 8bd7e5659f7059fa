"""Stage 2a for the shared trainer: our own ``AutoencoderKL`` for 32 x 32 Fashion-MNIST (or your own
images, grayscale or colour, at ``data.image_size``: ``data.source``).

    python train.py configs/autoencoder_fashion_quick.yaml
    python sample.py runs/autoencoder_fashion_quick --evaluate --n 10000   # PSNR, judge

The encoder maps an image x (1 x 32 x 32 in [-1, 1]) to a diagonal Gaussian q(z|x) =
N(mu, sigma^2) over latents z (C x h x w, by default 4 x 8 x 8: 4x fewer numbers than
pixels); the decoder maps a sample z = mu + sigma * eps back to an image. The loss, as for
Stable Diffusion's VAE (all terms are means over pixels or latent values):

    L_rec =  |x - D(z)|   (or (x - D(z))^2)
           + perceptual_weight * d(x, D(z))        a distance between features (latent/perceptual.py)
    loss  =  L_rec
           + kl_weight * KL(q(z|x) || N(0, I))     tiny: it only keeps the latents from drifting
           + lambda * L_GAN                        optional, from step disc_start

The GAN term pits the decoder against a patch discriminator that scores every overlapping
patch of an image as real or reconstructed, which rewards sharp texture over the blur an
L1/L2 loss settles for: L_GAN = -mean(D_patch(D(z))), the hinge loss's generator half. Its
weight lambda is ``disc_weight``, or with ``adaptive_disc_weight`` (Esser et al. 2021, eq. 7,
as Stable Diffusion's VAE was trained) ``disc_weight`` times

    |grad of L_rec| / (|grad of L_GAN| + 1e-4),   both gradients at the decoder's last layer,

so the adversarial push on the decoder's output stays in proportion to the reconstruction's
pull, whatever the scale of the discriminator's logits. Both networks are one model here,
trained by one optimizer: the decoder's adversarial term is computed with the discriminator
frozen, and the discriminator's own term on detached reconstructions, so each loss moves only
its network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ddpm.config import check_model_keys
from ddpm.contract import Capabilities, Stage
from ddpm.data import SOURCES, DataConfig, LabelledImages, class_names_of, load_images
from ddpm.data import load_training_set, pixel_format
from ddpm.errors import UserError
from ddpm.evaluate import cached_judge
from ddpm.judge import accuracy
from ddpm.metrics import embed, floor_images, frechet_distance, psnr, real_floor, reference_stats
from ddpm.plots import save_grid

from .perceptual import RandomFeatureDistance
from .space import LatentSpace


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): B x C x H x W images -> B x 1 x H/2^n x W/2^n real-vs-fake logits,
    one per overlapping patch."""

    def __init__(self, in_channels: int = 1, channels: int = 64, layers: int = 2):
        super().__init__()
        blocks = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, layers):
            c_in, c_out = channels * 2 ** (i - 1), channels * 2**i
            blocks += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(channels * 2 ** (layers - 1), 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Compute through ``module`` without its parameters collecting gradients."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def adaptive_gan_weight(reconstruction: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """|grad reconstruction| / (|grad gan| + 1e-4) at ``last_layer``, in [0, 1e4], a constant for
    backward. With several processes the gradients are those of the whole batch's loss (averaged
    over processes first), so two processes weigh the GAN term as one would."""
    grads = [torch.autograd.grad(term, last_layer, retain_graph=True)[0] for term in (reconstruction, gan)]
    if dist.is_available() and dist.is_initialized():
        for grad in grads:
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
    return (grads[0].norm() / (grads[1].norm() + 1e-4)).clamp(0, 1e4).detach()


class AutoencoderWithDiscriminator(ModelMixin, ConfigMixin):
    """What the trainer optimizes: ``vae`` (a diffusers ``AutoencoderKL``) and, if asked for,
    its ``discriminator``. Everything that touches their weights runs in ``forward``, so a
    multi-GPU wrapper sees one forward pass."""

    @register_to_config
    def __init__(self, vae_config: dict, use_discriminator: bool = False, disc_channels: int = 64,
                 disc_layers: int = 2):
        # (argument names differ from the attribute names: diffusers also sets each one as an attribute)
        super().__init__()
        self.vae = AutoencoderKL(**vae_config)
        self.discriminator = (PatchDiscriminator(vae_config["in_channels"], disc_channels, disc_layers)
                              if use_discriminator else None)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: B x 1 x 32 x 32 in [-1, 1]; eps: B x C x h x w standard normal, for z = mu + sigma * eps.

        Returns the reconstruction, the posterior's ``mean`` and ``logvar`` and, with a
        discriminator, its logits for the reconstruction (discriminator frozen), for real
        images, and for detached reconstructions.
        """
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mean + posterior.std * eps).sample
        out = {"recon": recon, "mean": posterior.mean, "logvar": posterior.logvar}
        if self.discriminator is not None:
            with frozen(self.discriminator):
                out["fake_logits"] = self.discriminator(recon)
            out["real_logits"] = self.discriminator(x)
            out["detached_fake_logits"] = self.discriminator(recon.detach())
        return out


@dataclasses.dataclass
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "mse"] = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0  # 0: no perceptual term
    disc_weight: float = 0.0  # 0: no discriminator
    adaptive_disc_weight: bool = False  # scale disc_weight by the ratio of the two terms' gradients
    disc_start: int = 0  # the step from which the GAN terms count (let reconstructions form first)
    disc_channels: int = 64
    disc_layers: int = 2

    def __post_init__(self):
        if min(self.kl_weight, self.perceptual_weight, self.disc_weight, self.disc_start) < 0:
            raise UserError("loss.kl_weight, loss.perceptual_weight, loss.disc_weight and loss.disc_start must be >= 0")


@dataclasses.dataclass
class AutoencoderStageConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict = dataclasses.field(default_factory=dict)  # keyword arguments of AutoencoderKL
    loss: AutoencoderLossConfig = dataclasses.field(default_factory=AutoencoderLossConfig)

    def __post_init__(self):
        check_model_keys(self.model, AutoencoderKL, ("in_channels", "out_channels", "sample_size"))


class AutoencoderStage(Stage):
    name = "autoencoder"
    Config = AutoencoderStageConfig
    data_sources = SOURCES
    capabilities = Capabilities(generates=False, evaluates=True)  # it reconstructs images; sample.py shows them

    def __init__(self, config: AutoencoderStageConfig):
        super().__init__(config)
        self.format = pixel_format(config.data)
        self.class_names = class_names_of(config.data)
        channels, side, _ = self.format.model_shape
        self.vae_kwargs = {"in_channels": channels, "out_channels": channels, "sample_size": side, **config.model}
        defaults = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items()}
        kwargs = {**defaults, **self.vae_kwargs}
        size = side // 2 ** (len(kwargs["block_out_channels"]) - 1)
        self.latent_shape = (kwargs["latent_channels"], size, size)
        self.perceptual = RandomFeatureDistance(kwargs["in_channels"]) if config.loss.perceptual_weight else None

    # -- training ---------------------------------------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        return load_training_set(self.config.data)

    def make_batch(self, raw: dict[str, torch.Tensor], generator: torch.Generator, step: int = 0
                   ) -> dict[str, torch.Tensor]:
        """x: B x 1 x 32 x 32 in [-1, 1] (your own images: B x ``data.channels`` x S x S); eps: B x C x h x w;
        adversarial: B, 1.0 once the GAN terms are on."""
        images = raw["images"]
        batch, device = len(images), images.device
        flip = torch.rand(batch, generator=generator, device=device) < 0.5 if self.config.data.flip else None
        eps = torch.randn((batch, *self.latent_shape), generator=generator, device=device)
        adversarial = torch.full((batch,), float(step >= self.config.loss.disc_start), device=device)
        return {"x": self.format.to_model_space(images, flip), "eps": eps, "adversarial": adversarial}

    def build_model(self) -> AutoencoderWithDiscriminator:
        c = self.config.loss
        return AutoencoderWithDiscriminator(self.vae_kwargs, c.disc_weight > 0, c.disc_channels, c.disc_layers)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config.loss
        x = batch["x"]
        out = model(x, batch["eps"])
        error = out["recon"] - x
        parts = {"reconstruction": error.abs().mean() if c.reconstruction == "l1" else error.pow(2).mean()}
        rec = parts["reconstruction"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual.to(x.device)(x, out["recon"])
            rec = rec + c.perceptual_weight * parts["perceptual"]
        parts["kl"] = 0.5 * (out["mean"].pow(2) + out["logvar"].exp() - 1 - out["logvar"]).mean()
        loss = rec + c.kl_weight * parts["kl"]
        if "fake_logits" in out:
            gan = -out["fake_logits"].mean()
            weight = c.disc_weight
            if c.adaptive_disc_weight:
                last_layer = extract_model_from_parallel(model).vae.decoder.conv_out.weight
                parts["gan_weight"] = weight = c.disc_weight * adaptive_gan_weight(rec, gan, last_layer)
            parts["discriminator"] = (F.relu(1 - out["real_logits"]).mean()
                                      + F.relu(1 + out["detached_fake_logits"]).mean())
            loss = loss + batch["adversarial"].mean() * (weight * gan + parts["discriminator"])
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    # -- looking at it ----------------------------------------------------------------

    def latent_space(self, model) -> LatentSpace:
        vae = model.vae if isinstance(model, AutoencoderWithDiscriminator) else model
        return LatentSpace(vae, self.format.model_shape[-1], pixels=self.format)

    def preview(self, model, path: Path, title: str = "") -> Path:
        """Two test images of each of (at most) ten classes: originals above their reconstructions. Your own
        images have no test split: the first training images of each class."""
        data = load_images(self.config.data, split="test")
        classes = list(range(len(self.class_names)))[:10]
        pairs = [torch.nonzero(data.labels == c)[:2, 0] for c in classes]
        first = torch.cat([p.repeat(2)[:2] for p in pairs if len(p)])  # a class of one image shows it twice
        shown = len(first) // 2
        originals = data.images[first].view(shown, 2, *data.images.shape[1:]).transpose(0, 1).flatten(0, 1)
        recon = self.latent_space(model).reconstruct(originals).cpu()
        grid = torch.stack([originals[:shown], recon[:shown], originals[shown:], recon[shown:]])
        title = title or "test images and their reconstructions"
        names = [self.class_names[c] for c, p in zip(classes, pairs) if len(p)]
        return save_grid(grid, path, ["original", "reconstruction"] * 2, title, col_titles=names)

    @torch.no_grad()
    def evaluate(self, model, n: int) -> dict:
        """On the first n real test images: mean PSNR (dB) of the reconstructions, and the
        judge's accuracy on the reconstructions and on the originals. And the ceiling of every
        latent model on this autoencoder: the FD to the test set of the reconstructions of the n
        training images the FD floor uses (``floor_images``), beside that floor."""
        data = self.config.data
        test = load_images(data, split="test")
        images, labels = test.images[:n], test.labels[:n]
        space = self.latent_space(model)

        def reconstruct(images):
            return torch.cat([space.reconstruct(chunk).cpu() for chunk in images.split(500)])

        recon = reconstruct(images)
        if data.source != "fashion_mnist":  # the judge knows Fashion-MNIST only: PSNR on the first training images
            return {"eval_psnr": psnr(recon, images).mean().item(), "eval_n": len(images)}
        judge = cached_judge()
        recon_floor, _ = embed(judge, reconstruct(floor_images(n, data.root)))
        return {"eval_psnr": psnr(recon, images).mean().item(),
                "eval_recon_accuracy": accuracy(judge, LabelledImages(recon, labels)),
                "eval_real_accuracy": accuracy(judge, LabelledImages(images, labels)),
                "eval_recon_fd": frechet_distance(recon_floor, reference_stats(judge, "test", data.root).features),
                "eval_fd_floor": real_floor(judge, n, data.root), "eval_n": len(images)}

    # -- saving and loading -----------------------------------------------------------

    def save_final(self, model, folder: Path) -> None:
        """Only the autoencoder (``vae/``): the discriminator is a training aid. Its
        ``scaling_factor`` is set when a latent run measures it on the cached latents."""
        model.vae.register_to_config(scaling_factor=1.0)
        model.vae.save_pretrained(folder / "vae")

    def load_model(self, folder: Path) -> AutoencoderKL:
        if (folder / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
        if (folder / "ema" / "config.json").is_file():
            return AutoencoderWithDiscriminator.from_pretrained(folder / "ema", use_safetensors=True).vae
        raise UserError(f"{folder} holds no autoencoder (expected vae/ or ema/ inside)")


