"""Stage 2b for the shared trainer: stage 1's class-conditioned diffusion, on latents.

    python train.py configs/latent_fashion_quick.yaml
    python sample.py runs/latent_fashion_quick --class all

Nothing about the diffusion changes, only its space (``Latents``): the UNet denoises scaled
latents (by default 4 x 8 x 8 instead of 1 x 32 x 32, 4x fewer numbers and 16x fewer positions),
and a sample becomes an image only at the very end, through the autoencoder's decoder. The autoencoder is ours
(``autoencoder.source`` = an autoencoder run) or a pretrained one (a diffusers folder or a
Hub name); it stays frozen, and the training set is encoded once (``latent/cache.py``).

The run's ``final/`` folder holds ``unet/``, ``scheduler/`` and ``vae/``, the last with the
measured scaling factor in its config.json, as in a Stable Diffusion model folder.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import UNet2DModel

from ddpm.data import SOURCES, load_training_set
from ddpm.errors import UserError
from ddpm.diffusion_stage import DiffusionStage, Pixels
from ddpm.stage import ClassConditionedDDPM, ClassLabel, DDPMConfig

from .cache import load_or_build
from .space import LatentSpace, load_autoencoder


@dataclasses.dataclass
class AutoencoderSourceConfig:
    source: str = "runs/autoencoder_fashion_quick"  # our autoencoder run, a diffusers folder, or a Hub name
    subfolder: str | None = None  # e.g. "vae" inside a whole Stable Diffusion repository
    image_size: int | None = None  # pixels per side fed to it; default: 32, or 8 x its down factor if larger
    per_channel: bool = False  # normalise each latent channel by its own mean and std (else: one scaling factor)
    cache_dir: str | None = None  # default: RUN/latent_cache for our runs, else runs/latent_cache/NAME
    encode_batch_size: int = 256

    def __post_init__(self):
        if self.encode_batch_size <= 0:
            raise UserError("autoencoder.encode_batch_size must be > 0")

    def cache_folder(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        if (Path(self.source) / "config.yaml").is_file():
            return Path(self.source) / "latent_cache"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.source}_{self.subfolder or ''}").strip("._")
        return Path("runs") / "latent_cache" / name


@dataclasses.dataclass
class LatentDDPMConfig(DDPMConfig):
    autoencoder: AutoencoderSourceConfig = dataclasses.field(default_factory=AutoencoderSourceConfig)


class Latents(Pixels):
    """Where stage 2 diffuses: the scaled latents of a frozen autoencoder (``autoencoder`` section)."""

    data_range = None  # latents have no fixed range (scaled to unit variance, not to [-1, 1]): nothing to clip

    def __init__(self, config):
        super().__init__(config)
        self._space: LatentSpace | None = None

    def latent_space(self) -> LatentSpace:
        """The frozen autoencoder, loaded on first use (its factor is set by ``load_data``)."""
        if self._space is None:
            a = self.config.autoencoder
            self._space = LatentSpace(load_autoencoder(a.source, a.subfolder), a.image_size,
                                      per_channel=a.per_channel, pixels=self.format)
        return self._space

    def load_data(self) -> dict[str, torch.Tensor]:
        """Normalised latents N x C x h x w (and of the mirrored images, with ``data.flip``) and
        labels, from the latent cache; encodes the training set first if there is none."""
        data = load_training_set(self.config.data)
        a = self.config.autoencoder
        state = PartialState()
        space = self.latent_space().to(state.device)
        with state.main_process_first():  # one process encodes, the others then read the cache
            cached = load_or_build(space, data["images"], a.cache_folder(), self.config.data.flip,
                                   a.encode_batch_size, say=print if state.is_main_process else lambda _: None)
        return {"labels": data["labels"], **{k: space.normalize(v) for k, v in cached.items()}}

    def clean_sample(self, raw: dict[str, torch.Tensor], flip: torch.Tensor | None) -> torch.Tensor:
        """x0 for a batch: the cached latents of each image or, where ``flip``, of its mirror image."""
        if flip is None:
            return raw["latents"]
        return torch.where(flip[:, None, None, None], raw["latents_flipped"], raw["latents"])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.latent_space().latent_shape

    def measured_latent_space(self) -> LatentSpace:
        """The latent space with its scaling factor (sampling a checkpoint: from the cache)."""
        space = self.latent_space()
        if space.scaling_factor is None:
            self.load_data()
        return space

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        return self.measured_latent_space().to(x0.device).decode(x0.float())

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.measured_latent_space().to(images.device).encode(images)

    def save(self, folder: Path) -> None:
        self.latent_space().save_pretrained(folder / "vae")

    def load(self, folder: Path) -> None:
        """A ``final/`` folder's own autoencoder, with the scaling factor measured for this run."""
        if (folder / "vae" / "config.json").is_file():
            self._space = LatentSpace.from_pretrained(folder / "vae", self.format)


class LatentDDPM(DiffusionStage):
    """Stage 1's condition, the class label, in the latents' space."""

    name = "latent"
    Config = LatentDDPMConfig
    data_sources = SOURCES
    capabilities = ClassConditionedDDPM.capabilities
    Space = Latents
    Condition = ClassLabel
    model_class = UNet2DModel
