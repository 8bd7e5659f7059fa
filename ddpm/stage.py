"""Stage 1 for the shared trainer: a class-conditioned UNet denoising Fashion-MNIST pixels.

A *stage* gives train.py everything that is not generic:
    load_data()              -> dict of equal-length tensors held in memory
    make_batch(raw, gen, step) -> a training batch, with all its randomness drawn from ``gen``
    build_model()            -> the network to train
    loss(model, batch)       -> a scalar
    preview(model, path)     -> a sample grid PNG
    save_final(model, dir)   -> the trained model as ``save_pretrained`` folders
and sample.py uses ``load_model`` and ``generate``.

Stage 2 (``latent/stage.py``) reuses all of this on autoencoder latents by changing two
things: ``sample_shape`` (what the UNet denoises) and ``to_images`` (how that becomes pixels).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .config import build
from .data import CLASS_NAMES, HUB_NAME, PADDED_SIZE, load_fashion_mnist, to_model_space, to_pixels
from .diffusion import (
    SAMPLERS,
    condition_dropout_mask,
    diffusion_loss,
    draw_timesteps_and_noise,
    guide,
    make_sampler,
    sample_loop,
)
from .errors import UserError
from .evaluate import as_metrics, evaluate_model
from .plots import save_grid


@dataclasses.dataclass
class DataConfig:
    root: str | None = None  # folder with the IDX files; default: $FASHION_MNIST_DIR, Debian, Hub
    hub_name: str | None = HUB_NAME  # null: never go online
    flip: bool = True  # random horizontal flips
    limit: int | None = None  # train on the first N images only (tests)


@dataclasses.dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    p_uncond: float = 0.1  # label dropout to the null class, for classifier-free guidance
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5 is the paper's choice)

    def __post_init__(self):
        if not 0 <= self.p_uncond <= 1:
            raise UserError(f"diffusion.p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.num_train_timesteps < 2:
            raise UserError(f"diffusion.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")


@dataclasses.dataclass
class SampleConfig:
    """Defaults for preview grids during training and for sample.py."""

    scheduler: Literal["ddpm", "ddim", "dpm++", "euler"] = "dpm++"
    steps: int = 25
    guidance: float = 3.0
    n_per_class: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.n_per_class <= 0:
            raise UserError("sample.steps and sample.n_per_class must be > 0")


def load_training_set(c: DataConfig) -> dict[str, torch.Tensor]:
    """images: uint8 N x 28 x 28; labels: int64 N (the first ``c.limit`` if set)."""
    data = load_fashion_mnist("train", root=c.root, hub_name=c.hub_name)
    n = c.limit or len(data)
    return {"images": data.images[:n], "labels": data.labels[:n]}


def check_model_keys(model: dict, cls: type, derived: tuple[str, ...]) -> None:
    """The ``model`` section holds keyword arguments of ``cls``, except those the stage derives
    from the data (``derived``)."""
    valid = set(inspect.signature(cls.__init__).parameters) - {"self", *derived}
    for key in model:
        if key in derived:
            raise UserError(f"model.{key} is set from the data; remove it from the config")
        if key not in valid:
            raise UserError(f"unknown key model.{key}; valid {cls.__name__} keys: {', '.join(sorted(valid))}")


@dataclasses.dataclass
class DDPMConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict = dataclasses.field(default_factory=dict)  # keyword arguments of UNet2DModel
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def __post_init__(self):
        check_model_keys(self.model, UNet2DModel, ("sample_size", "in_channels", "out_channels", "num_class_embeds"))


class ClassConditionedDDPM:
    name = "ddpm"
    Config = DDPMConfig

    def __init__(self, config: DDPMConfig):
        self.config = config
        self.class_names = CLASS_NAMES
        self.null_label = len(CLASS_NAMES)  # the extra class embedding: "no class", for CFG
        d = config.diffusion
        self.scheduler = DDPMScheduler(num_train_timesteps=d.num_train_timesteps,
                                       beta_schedule=d.beta_schedule, prediction_type=d.prediction_type)

    @classmethod
    def from_dict(cls, sections: dict) -> "ClassConditionedDDPM":
        return cls(build(cls.Config, sections, where="config"))

    # -- training ---------------------------------------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        return load_training_set(self.config.data)

    def make_batch(self, raw: dict[str, torch.Tensor], generator: torch.Generator, step: int = 0
                   ) -> dict[str, torch.Tensor]:
        """A raw batch (images or latents, labels) -> x0 (B x ``sample_shape``), labels with
        some set to the null label, timesteps (B) and noise (like x0)."""
        labels = raw["labels"]
        batch, device = len(labels), labels.device
        flip = torch.rand(batch, generator=generator, device=device) < 0.5 if self.config.data.flip else None
        x0 = self.clean_sample(raw, flip)
        dropped = condition_dropout_mask(batch, self.config.diffusion.p_uncond, generator, device)
        labels = torch.where(dropped, self.null_label, labels)
        timesteps, noise = draw_timesteps_and_noise(x0, self.scheduler.config.num_train_timesteps, generator)
        return {"x0": x0, "labels": labels, "timesteps": timesteps, "noise": noise}

    def clean_sample(self, raw: dict[str, torch.Tensor], flip: torch.Tensor | None) -> torch.Tensor:
        """x0 for a batch: uint8 images -> B x 1 x 32 x 32 in [-1, 1], mirrored where ``flip``."""
        return to_model_space(raw["images"], flip)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """C x H x W of what the UNet denoises: padded pixels here."""
        return (1, PADDED_SIZE, PADDED_SIZE)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """A denoised sample (B x ``sample_shape``) -> uint8 B x 28 x 28."""
        return to_pixels(x0.float())

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 28 x 28 -> clean samples B x ``sample_shape`` (the start of img2img)."""
        return to_model_space(images)

    def build_model(self) -> UNet2DModel:
        channels, size, _ = self.sample_shape
        kwargs = dict(sample_size=size, in_channels=channels, out_channels=channels,
                      num_class_embeds=len(self.class_names) + 1)
        return UNet2DModel(**kwargs, **self.config.model)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x_t = self.scheduler.add_noise(batch["x0"], batch["noise"], batch["timesteps"])
        prediction = model(x_t, batch["timesteps"], class_labels=batch["labels"]).sample
        return diffusion_loss(self.scheduler, prediction, batch["x0"], batch["noise"], batch["timesteps"],
                              self.config.diffusion.snr_gamma)

    # -- sampling ---------------------------------------------------------------------

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """The guided network output for x (B x ``sample_shape``) at timestep t, asked for ``labels``.

        Conditional and unconditional branches run as one batch of 2B.
        """
        null = torch.full_like(labels, self.null_label)
        if guidance == 1:
            return model(x, t, class_labels=labels).sample
        if guidance == 0:
            return model(x, t, class_labels=null).sample
        cond, uncond = model(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        return guide(cond, uncond, guidance)

    def generate(self, model, labels: torch.Tensor, *, guidance: float | None = None, **settings) -> torch.Tensor:
        """Sample one image per entry of ``labels`` (int64 N); returns uint8 N x 28 x 28.
        ``settings``: those of ``run_sampler``."""
        guidance = self.config.sample.guidance if guidance is None else guidance
        return self.run_sampler(model, labels, lambda x, t, chunk: self.predict(model, x, t, chunk, guidance),
                                **settings)

    @torch.no_grad()
    def run_sampler(self, model, conditions: torch.Tensor, predict, *, scheduler: str | None = None,
                    steps: int | None = None, seed: int | None = None, batch_size: int = 500,
                    progress: bool = False, init_images: torch.Tensor | None = None,
                    strength: float = 1.0) -> torch.Tensor:
        """One image per entry of ``conditions`` (N x ...): predict(x, t, conditions chunk) -> the
        guided network output. Returns uint8 N x 28 x 28.

        The same seed gives the same images; batches are seeded ``seed + batch index``. img2img:
        ``init_images`` (uint8 N x 28 x 28) are noised according to ``strength`` (see
        ``sample_loop``) instead of starting from pure noise.
        """
        s = self.config.sample
        scheduler, steps = scheduler or s.scheduler, steps or s.steps
        seed = s.seed if seed is None else seed
        if scheduler not in SAMPLERS:
            raise UserError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SAMPLERS)}")
        if not 0 <= strength <= 1:
            raise UserError(f"strength must be in [0, 1], got {strength}")
        device = next(model.parameters()).device
        model.eval()
        sampler = make_sampler(scheduler, self.scheduler)
        out = []
        for i, index in enumerate(torch.arange(len(conditions)).split(batch_size)):
            chunk = conditions[index].to(device)
            generator = torch.Generator(device).manual_seed(seed + i)
            noise = torch.randn((len(chunk), *self.sample_shape), generator=generator, device=device)
            init = self.from_images(init_images[index].to(device)) if init_images is not None else None
            with _autocast(device):
                x0 = sample_loop(lambda x, t: predict(x, t, chunk), sampler, noise, steps, generator,
                                 progress=progress, init=init, strength=strength)
            out.append(self.to_images(x0).cpu())
        return torch.cat(out)

    def preview(self, model, path: Path, title: str = "") -> Path:
        """One row per class, ``sample.n_per_class`` columns, fixed seed."""
        n = self.config.sample.n_per_class
        labels = torch.arange(len(self.class_names)).repeat_interleave(n)
        images = self.generate(model, labels)
        s = self.config.sample
        title = title or f"{s.scheduler}, {s.steps} steps, guidance {s.guidance:g}"
        return save_grid(images.view(len(self.class_names), n, 28, 28), path, list(self.class_names), title)

    def evaluate(self, model, n: int) -> dict:
        """The judge's metrics for n samples at the ``sample`` settings (for eval_every)."""
        return as_metrics(evaluate_model(self, model, n))

    # -- saving and loading -----------------------------------------------------------

    def save_final(self, model, folder: Path) -> None:
        model.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")

    def load_model(self, folder: Path) -> UNet2DModel:
        """The UNet from a ``final/`` folder (``unet/``) or a checkpoint (its EMA weights, ``ema/``)."""
        for sub in ("unet", "ema"):
            if (folder / sub / "config.json").is_file():
                return UNet2DModel.from_pretrained(folder / sub, use_safetensors=True)
        raise UserError(f"{folder} holds no model (expected unet/ or ema/ inside)")


def _autocast(device: torch.device):
    """bf16 autocast on GPUs that have it; plain fp32 elsewhere."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
