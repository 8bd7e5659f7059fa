"""An autoencoder as the diffusion model sees it: images <-> normalised latents.

    encode:  uint8 B x 28 x 28  ->  z = (E(x) - shift_factor) * scaling_factor        float B x C x h x w
    decode:  z                  ->  D(z / scaling_factor + shift_factor) as pixels   uint8 B x 28 x 28

(Fashion-MNIST's images; your own are uint8 B x S x S or B x 3 x S x S, as their ``PixelFormat`` says.)

The diffusion model never sees pixels, only z. Its noise schedule assumes data of about zero
mean and unit variance (at t = T the sample must be almost pure N(0, 1) noise), so the
autoencoder's latents are normalised with factors measured on the training data
(``latent/cache.py``). Stable Diffusion uses one number, ``scaling_factor`` = 1 / std over all
latent values (0.18215 for its VAE on its images), and no shift; Stable Diffusion 3 also
subtracts a ``shift_factor``. With ``per_channel`` each channel gets its own mean and std, as
SD3 and FLUX do in spirit: our autoencoder's channels have means far from 0 and spreads that
differ by more than 2x, which one number cannot fix. Encoding with one normalisation and decoding
with another silently gives washed-out or blown-out samples, so one ``LatentSpace`` object does
both.

A saved latent space is a diffusers ``AutoencoderKL`` folder that Stable Diffusion's pipelines
read, and they know only ``scaling_factor``: per-channel factors are folded into the weights of
the autoencoder's 1 x 1 ``quant_conv`` and ``post_quant_conv`` (``folded``), so the saved
autoencoder's own latents are already normalised, and its ``scaling_factor`` is 1.

Any autoencoder works: our own 1-channel ``AutoencoderKL`` (``latent/autoencoder.py``) sees the
padded 32 x 32 image; a pretrained RGB one (``stabilityai/sd-vae-ft-mse``,
``madebyollin/taesd``) sees it as 3 equal channels, resized so its latent grid is at least
8 x 8 (64 px for a down factor of 8), and its output is averaged back to 1 channel, 32 x 32.
Colour images go to an RGB autoencoder as they are.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny

from ddpm.data import FASHION_MNIST, PixelFormat
from ddpm.errors import UserError
from ddpm.run_folder import is_local_path, missing_folder

AUTOENCODERS = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
MIN_LATENT_SIZE = 8


def down_factor(vae) -> int:
    """How many pixels per latent cell along each side (8 for SD's VAE and TAESD)."""
    blocks = vae.config.get("block_out_channels") or vae.config["encoder_block_out_channels"]
    return 2 ** (len(blocks) - 1)


class LatentSpace:
    """An autoencoder (eval mode, frozen) with the size it is fed and the latents' normalisation:
    ``scaling_factor`` and ``shift_factor``, each a number or a tensor of one value per channel
    (``per_channel``), measured from the cache unless given. ``pixels``: the images it encodes and decodes
    (Fashion-MNIST's, or your own)."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny, image_size: int | None = None,
                 scaling_factor: float | torch.Tensor | None = None, per_channel: bool = False,
                 pixels: PixelFormat = FASHION_MNIST):
        self.vae = vae.eval().requires_grad_(False)
        self.factor = down_factor(vae)
        self.pixels = pixels
        self.pixel_size = pixels.model_shape[-1]  # the side of the images as the network sees them (32: padded)
        if pixels.channels not in (1, vae.config.in_channels):
            raise UserError(f"the autoencoder takes {vae.config.in_channels}-channel images and data.channels is "
                            f"{pixels.channels}: use an autoencoder trained on images like these")
        self.image_size = image_size or max(self.pixel_size, MIN_LATENT_SIZE * self.factor)
        if self.image_size % self.factor:
            raise UserError(f"autoencoder.image_size={self.image_size} must be a multiple of the "
                            f"autoencoder's down factor {self.factor}")
        if per_channel and not has_quant_convs(vae):
            raise UserError("autoencoder.per_channel needs an AutoencoderKL with quant_conv and post_quant_conv "
                            "(where a saved run folds the factors in); set autoencoder.per_channel=false")
        self.per_channel = per_channel
        self.scaling_factor = scaling_factor
        self.shift_factor: float | torch.Tensor = 0.0
        self.channels = vae.config.latent_channels
        self.latent_size = self.image_size // self.factor

    def measure(self, stats: dict) -> None:
        """Set the normalisation from the latent cache's statistics (``latent/cache.py``)."""
        if self.per_channel:
            self.shift_factor = torch.tensor(stats["channel_mean"])
            self.scaling_factor = 1 / torch.tensor(stats["channel_std"])
        else:
            self.scaling_factor = stats["scaling_factor"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.latent_size, self.latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device) -> "LatentSpace":
        self.vae.to(device)
        return self

    # -- pixels <-> what the autoencoder takes ------------------------------------------

    def vae_input(self, images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 B x 28 x 28 -> float B x in_channels x image_size x image_size in [-1, 1]."""
        return self.padded_to_vae_input(self.pixels.to_model_space(images.to(self.device), flip))

    def padded_to_vae_input(self, x: torch.Tensor) -> torch.Tensor:
        """float B x 1 x 32 x 32 in [-1, 1] (``to_model_space``) -> what the autoencoder takes."""
        x = x.to(self.device)
        if self.image_size != self.pixel_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x.expand(-1, self.vae.config.in_channels, -1, -1)

    def vae_output_to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """float B x out_channels x image_size x image_size in about [-1, 1] -> uint8 B x 28 x 28."""
        x = x.float()
        if self.pixels.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != self.pixel_size:
            x = F.interpolate(x, size=self.pixel_size, mode="bilinear", antialias=True, align_corners=False)
        return self.pixels.to_pixels(x)

    # -- latents ------------------------------------------------------------------------

    @torch.no_grad()
    def posterior(self, images: torch.Tensor, flip: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 B x 28 x 28 -> the unscaled posterior mean and std, each B x C x h x w.
        A deterministic autoencoder (TAESD) has one latent per image and no std (None)."""
        out = self.vae.encode(self.vae_input(images, flip))
        if hasattr(out, "latent_dist"):
            return out.latent_dist.mean, out.latent_dist.std
        return out.latents, None

    @torch.no_grad()
    def sample_latents(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """float B x 1 x 32 x 32 in [-1, 1] -> scaled latents drawn from the posterior, mean + std *
        noise, the noise from ``generator`` (as diffusers' pipelines encode an input image); with no
        generator, the posterior mean."""
        out = self.vae.encode(self.padded_to_vae_input(x))
        if not hasattr(out, "latent_dist"):
            return self.normalize(out.latents)
        mean, std = out.latent_dist.mean, out.latent_dist.std
        if generator is None:
            return self.normalize(mean)
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        return self.normalize(mean + std * noise)

    def encode_unscaled(self, images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 B x 28 x 28 -> B x C x h x w: the posterior mean, before scaling."""
        return self.posterior(images, flip)[0]

    def encode(self, images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 B x 28 x 28 -> normalised latents B x C x h x w (mean about 0, std about 1 over the data)."""
        return self.normalize(self.encode_unscaled(images, flip))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents B x C x h x w -> uint8 B x 28 x 28."""
        return self.vae_output_to_pixels(self.vae.decode(self.denormalize(latents.to(self.device))).sample)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 28 x 28 -> uint8 B x 28 x 28 through the autoencoder (no scaling involved)."""
        return self.vae_output_to_pixels(self.vae.decode(self.encode_unscaled(images)).sample)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The autoencoder's latents B x C x h x w -> (latents - shift_factor) * scaling_factor."""
        shift, scale = self._factors(latents)
        return (latents - shift) * scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the autoencoder's: z / scaling_factor + shift_factor."""
        shift, scale = self._factors(z)
        return z / scale + shift

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """shift_factor and scaling_factor, per-channel ones shaped C x 1 x 1 on ``like``'s device."""
        scale = self._measured_scaling_factor()
        as_channels = (lambda f: f.to(like).view(-1, 1, 1)) if self.per_channel else (lambda f: f)
        return as_channels(self.shift_factor), as_channels(scale)

    def _measured_scaling_factor(self) -> float | torch.Tensor:
        if self.scaling_factor is None:
            raise RuntimeError("the scaling factor is measured from the latent cache; build it first")
        return self.scaling_factor

    # -- saving ------------------------------------------------------------------------

    def folded(self, scaling_factor: float = 1.0) -> "LatentSpace":
        """The same latent space on a copy of the autoencoder whose own latents are
        normalize(latents) / ``scaling_factor`` (both factors moved into its 1 x 1 quant_conv and
        post_quant_conv), with ``scaling_factor`` in its config: a pipeline that knows only that
        one number gets exactly our normalised latents, and the decoder sees the same numbers.
        The posterior's std is scaled with its mean (its log-variance shifted)."""
        if not has_quant_convs(self.vae):
            raise UserError("folding the latent normalisation into an autoencoder needs its quant_conv and "
                            "post_quant_conv; this one has none (use one of ours, or an SD VAE)")
        c = self.channels
        shift, scale = (torch.as_tensor(f, dtype=torch.float32).reshape(-1).expand(c)
                        for f in (self.shift_factor, self._measured_scaling_factor()))
        k = (scale / scaling_factor).to(self.device)  # per channel: folded latents = (latents - shift) * k
        shift = shift.to(self.device)
        vae = copy.deepcopy(self.vae)
        with torch.no_grad():
            post = vae.post_quant_conv
            post.bias += post.weight[:, :, 0, 0] @ shift  # D's input is folded / k + shift
            post.weight /= k.view(1, -1, 1, 1)
            mean, logvar = slice(0, c), slice(c, 2 * c)
            vae.quant_conv.weight[mean] *= k.view(-1, 1, 1, 1)
            vae.quant_conv.bias[mean] = (vae.quant_conv.bias[mean] - shift) * k
            vae.quant_conv.bias[logvar] += 2 * k.log()  # std x k
        vae.register_to_config(scaling_factor=scaling_factor)
        return LatentSpace(vae, self.image_size, scaling_factor, pixels=self.pixels)

    def save_pretrained(self, folder: Path) -> None:
        """The autoencoder with *our* scaling factor in its config.json (per-channel factors folded
        into its weights first), plus the image size."""
        if self.per_channel:
            return self.folded(1.0).save_pretrained(folder)
        self.vae.register_to_config(scaling_factor=self._measured_scaling_factor())
        self.vae.save_pretrained(folder)
        (folder / "latent_space.json").write_text(json.dumps({"image_size": self.image_size}))

    @classmethod
    def from_pretrained(cls, folder: Path, pixels: PixelFormat = FASHION_MNIST) -> "LatentSpace":
        """A folder written by ``save_pretrained``: the factor comes from its config.json."""
        vae = load_autoencoder(str(folder))
        size = json.loads((folder / "latent_space.json").read_text())["image_size"]
        return cls(vae, size, vae.config.scaling_factor, pixels=pixels)


def has_quant_convs(vae) -> bool:
    return isinstance(vae, AutoencoderKL) and vae.config.use_quant_conv and vae.config.use_post_quant_conv


def load_autoencoder(source: str, subfolder: str | None = None) -> AutoencoderKL | AutoencoderTiny:
    """An autoencoder from a local folder in diffusers format, or by Hub name.

    ``source``: our autoencoder run (its ``final/vae``), a folder holding ``config.json`` and
    weights (``AutoencoderKL`` or ``AutoencoderTiny``), or a Hub name such as
    ``stabilityai/sd-vae-ft-mse`` or ``madebyollin/taesd`` (downloaded once, then cached).
    """
    path = Path(source)
    if (path / "config.yaml").is_file():  # one of our autoencoder runs
        path = path / "final" / "vae"
        if not (path / "config.json").is_file():
            raise UserError(f"{source} has no final/vae yet; finish training it (train.resume=latest)")
    local = path.is_dir()
    if not local and (is_local_path(source) or path.suffix):
        raise missing_folder(source, "autoencoder run or folder")
    where = str(path) if local else source
    try:
        config = AutoencoderKL.load_config(where, subfolder=subfolder, local_files_only=local)
    except (OSError, ValueError) as e:
        how = "is it a diffusers autoencoder folder?" if local else "is the name right and the Hub reachable?"
        raise UserError(f"cannot read the autoencoder config of {where}: {how} "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    cls = AUTOENCODERS.get(config.get("_class_name"))
    if cls is None:
        raise UserError(f"{where} holds a {config.get('_class_name')}, not one of {', '.join(AUTOENCODERS)}")
    return cls.from_pretrained(where, subfolder=subfolder, local_files_only=local, use_safetensors=True)
