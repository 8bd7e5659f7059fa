"""What every diffusion stage shares: the training batch, the loss, classifier-free guidance,
the sampler, preview grids, evaluation, saving and loading, each written once.

A diffusion stage is a space and a condition (``ddpm/stage.py`` is the whole of stage 1):
  * **where it diffuses**, a ``Space``: ``sample_shape``, ``clean_sample`` (data -> x0),
    ``to_images`` and ``from_images``; ``Pixels`` here, autoencoder latents in ``latent/stage.py``;
  * **what it is conditioned on**, a ``Condition``, which reaches the network through one hook,
    ``denoise``: its inputs are a dict of the network's keyword arguments (``class_labels``,
    ``encoder_hidden_states``) plus, under ``"concat"``, extra input channels concatenated to x_t
    (image conditions). The condition owns its null condition, the inputs it makes from a batch,
    the data it needs and its ``generate``; a class label here, a prompt in ``conditioning/text``;
  * and, for a fine-tune, a ``Recipe``: how it starts from a trained run.

Classifier-free guidance runs the conditional and the null branch as one batch of 2B; any
"concat" channels are the same in both branches. Autoguidance (``sample.guide_with``) runs the
conditional branch through the run's model and through a weaker one, and guides away from the latter.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Literal

import torch

from .contract import Stage
from .data import class_names_of, load_training_set, pixel_format
from .diffusion import Diffusion, condition_dropout_mask, diffusion_loss, draw_timesteps_and_noise, guide
from .diffusion import clip_denoised, make_sampler, noisy_sample, predicted_x0, sample_loop, samplers_for
from .diffusion import USUAL_SAMPLER
from .errors import UserError
from .evaluate import as_metrics, evaluate_model
from .plots import save_grid
from .request import check_request
from .run_folder import run_dir_of

NetworkInputs = dict[str, torch.Tensor]  # network keyword arguments, and "concat" channels; batch first


@dataclasses.dataclass
class DiffusionConfig:
    # "ddpm": the variance-preserving noise schedule below; "flow": rectified flow (Stable Diffusion 3), a
    # straight path from data to noise and a network that predicts the velocity (see ddpm/diffusion.py)
    objective: Literal["ddpm", "flow"] = "ddpm"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    p_uncond: float = 0.1  # condition dropout to the null condition, for classifier-free guidance
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5 is the paper's choice)
    # EDM-style training (Karras et al. 2022; see ddpm/diffusion.py): noise levels drawn log-normally,
    # ln sigma ~ N(P_mean, P_std^2) (EDM: [-1.2, 1.2]), instead of uniform timesteps; and EDM's loss weight
    # for data of std sigma_data (EDM: 0.5), instead of min-SNR
    lognormal_noise: tuple[float, float] | None = None
    sigma_data: float | None = None
    # flow: its times drawn t = sigmoid(u), u ~ N(m, s^2) (SD3: [0, 1]), null: uniform; and shifted toward
    # noise, t' = shift t / (1 + (shift - 1) t), in training and sampling (SD3: 3 for 1024 x 1024 images)
    logit_normal: tuple[float, float] | None = None
    shift: float = 1.0

    def __post_init__(self):
        ddpm_only = {"lognormal_noise": None, "sigma_data": None}
        flow_only = {"logit_normal": None, "shift": 1.0}
        for key, default in (ddpm_only if self.objective == "flow" else flow_only).items():
            if getattr(self, key) != default:
                raise UserError(f"diffusion.{key} is a setting of the "
                                f"{'ddpm' if self.objective == 'flow' else 'flow'} objective; remove it or set "
                                f"diffusion.objective: {'ddpm' if self.objective == 'flow' else 'flow'}")
        if self.shift <= 0 or (self.logit_normal is not None and self.logit_normal[1] <= 0):
            raise UserError(f"diffusion.shift must be > 0 and diffusion.logit_normal [m, s] have s > 0, got "
                            f"{self.shift} and {self.logit_normal}")
        if not 0 <= self.p_uncond <= 1:
            raise UserError(f"diffusion.p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.snr_gamma is not None and self.sigma_data is not None:
            raise UserError("diffusion.snr_gamma (min-SNR) and diffusion.sigma_data (EDM) are two loss weightings; "
                            "set one")
        if self.lognormal_noise is not None and self.lognormal_noise[1] <= 0:
            raise UserError(f"diffusion.lognormal_noise is [P_mean, P_std] with P_std > 0, got {self.lognormal_noise}")
        if self.num_train_timesteps < 2:
            raise UserError(f"diffusion.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")


@dataclasses.dataclass
class SampleConfig:
    """Defaults for preview grids during training and for sample.py."""

    # the ddpm objective's samplers, or flow's: "flow-euler", "flow-midpoint", "flow-heun" (ddpm/diffusion.py);
    # null: the objective's usual one, dpm++ or flow-midpoint
    scheduler: Literal["ddpm", "ddim", "dpm++", "euler", "edm-euler", "edm-dpm++", "flow-euler", "flow-midpoint",
                       "flow-heun"] | None = None
    steps: int = 25
    guidance: float = 3.0
    # guide (w > 1) only at training timesteps lo <= t <= hi, plain conditional elsewhere
    # (Kynkäänniemi et al. 2024); null: at every step. Flow's timesteps are 1000 t on its path
    guidance_interval: tuple[int, int] | None = None
    clip_denoised: bool = True  # keep the clean-sample estimate within the data's range (see ddpm/diffusion.py)
    # autoguidance (Karras et al. 2024): guide with this weaker model of the run, asked for the same condition,
    # instead of the null condition; a checkpoint or run folder, relative to the run directory
    # (checkpoints/step-00000900: the EMA weights of an early checkpoint, ``train.keep_steps`` keeps it);
    # previews during training, before that model is final, guide with the null condition
    guide_with: str | None = None
    guide_with_null: bool = False  # ask that weaker model for the null condition: away from its errors and toward c
    n_per_class: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.steps <= 0 or self.n_per_class <= 0:
            raise UserError("sample.steps and sample.n_per_class must be > 0")
        if self.guidance_interval is not None and not 0 <= self.guidance_interval[0] <= self.guidance_interval[1]:
            raise UserError(f"sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi, got "
                            f"{list(self.guidance_interval)}")


class Pixels:
    """Where stage 1 diffuses: the pixels of the ``data`` section's images, scaled to [-1, 1]; Fashion-MNIST's
    padded to 1 x 32 x 32, your own at ``data.channels`` x ``data.image_size`` x ``data.image_size``."""

    data_range = 1.0  # clean samples lie in [-data_range, data_range]; None: no known range

    def __init__(self, config):
        self.config = config
        self.format = pixel_format(config.data)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """C x H x W of what the network denoises."""
        return self.format.model_shape

    def load_data(self) -> dict[str, torch.Tensor]:
        """images: uint8 N x H x W (or N x 3 x H x W); labels: int64 N."""
        return load_training_set(self.config.data)

    def clean_sample(self, raw: dict[str, torch.Tensor], flip: torch.Tensor | None) -> torch.Tensor:
        """x0 for a batch: uint8 images -> B x ``sample_shape`` in [-1, 1], mirrored where ``flip``."""
        return self.format.to_model_space(raw["images"], flip)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """A denoised sample (B x ``sample_shape``) -> uint8 images, B x 28 x 28 for Fashion-MNIST."""
        return self.format.to_pixels(x0.float())

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> clean samples B x ``sample_shape`` (the start of img2img)."""
        return self.format.to_model_space(images)

    def save(self, folder: Path) -> None:
        """What ``final/`` holds of the space besides the network: nothing for pixels."""

    def load(self, folder: Path) -> None:
        """What a ``final/`` folder holds of the space (an autoencoder)."""


class Condition:
    """What a stage is conditioned on; a subclass says what (a class label, a prompt, image channels).

    It owns the null condition (``null_condition``), the network inputs it makes (``model_condition``, a
    ``NetworkInputs`` dict), the data it needs beside the space's (``load_data``) and from each
    training example (``batch_entries``) and its ``generate``. ``stage`` is the diffusion stage it
    conditions."""

    extra_channels: int = 0  # input channels concatenated to x_t

    def __init__(self, stage):
        self.stage, self.config = stage, stage.config

    def network_args(self) -> dict:
        """The network's constructor arguments for the condition (``num_class_embeds``, ...)."""
        return {}

    def load_data(self) -> dict[str, torch.Tensor]:
        """Training data beside the space's (N x ...); called before the space loads its own."""
        return {}

    def batch_entries(self, raw: dict[str, torch.Tensor], dropped: torch.Tensor, flip: torch.Tensor | None,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The condition of each example of a raw batch as batch entries (B x ...), the null condition where
        ``dropped`` (bool B), mirrored where ``flip`` as x0 is; any randomness from ``generator``."""
        raise NotImplementedError

    def model_condition(self, batch: dict[str, torch.Tensor]) -> NetworkInputs:
        """A training (micro-)batch's condition entries -> the ``NetworkInputs`` the network takes."""
        raise NotImplementedError

    def class_condition(self, labels: torch.Tensor, phrasings: str = "train") -> NetworkInputs:
        """What asks for class ``labels`` (int64 N). ``phrasings`` is for prompts ("train": the
        training captions, "unseen": never trained on)."""
        raise NotImplementedError

    def null_condition(self, condition: NetworkInputs, negative_prompt: str = "") -> NetworkInputs:
        """The unconditional branch of CFG for each entry of ``condition`` (the same batch size)."""
        raise NotImplementedError

    def generate(self, model, labels: torch.Tensor, *, phrasings: str = "train", negative_prompt: str = "",
                 **settings) -> torch.Tensor:
        """One image per class label (int64 N) -> uint8 N x 28 x 28; ``settings``: those of ``sample``."""
        condition = self.class_condition(labels, phrasings)
        return self.stage.sample(model, condition, self.null_condition(condition, negative_prompt), **settings)

    def sampling_inputs(self, condition: NetworkInputs | list[NetworkInputs], null: NetworkInputs,
                        init_images: torch.Tensor | None, generator: torch.Generator):
        """One sampling batch's random draws and what they make: (the starting noise, B x
        ``sample_shape``; img2img's clean start from ``init_images``, or None; the condition and
        its null branch as the network takes them). Image channels draw here too, in the order
        their diffusers pipeline does, so that both give the same images for one seed."""
        space = self.stage.space
        noise = torch.randn((len(next(iter(null.values()))), *space.sample_shape), generator=generator,
                            device=generator.device)
        init = space.from_images(init_images) if init_images is not None else None
        return noise, init, condition, null

    def after_step(self, condition: NetworkInputs | list[NetworkInputs], noise: torch.Tensor, sampler
                   ) -> Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None:
        """What replaces a batch's sample after every sampler step (``sample_loop``'s ``after_step``),
        from its condition (as ``sample`` was given it) and starting noise; None: nothing does.
        Inpainting puts the known region back."""
        return None

    def preview_rows(self, n: int) -> tuple[list[str], NetworkInputs]:
        """The preview grid's row titles, and the condition of its images: n per row, row by row."""
        labels = torch.arange(len(self.stage.class_names)).repeat_interleave(n)
        return list(self.stage.class_names), self.class_condition(labels)

    def preview(self, model, path: Path, title: str = "") -> Path:
        """One row per class (or class prompt), ``sample.n_per_class`` columns, fixed seed."""
        s = self.config.sample
        rows, condition = self.preview_rows(s.n_per_class)
        images = self.stage.sample(model, condition, self.null_condition(condition))
        title = title or f"{s.scheduler}, {s.steps} steps, guidance {s.guidance:g}"
        return save_grid(images.view(len(rows), s.n_per_class, *images.shape[1:]), path, rows, title)

    def save(self, folder: Path) -> None:
        """What ``final/`` holds of the condition besides the network (a text encoder)."""

    def load(self, folder: Path) -> None:
        """What a ``final/`` folder holds of the condition."""


class Recipe:
    """How a stage trains other than from scratch on its own data (a fine-tune), applied to any stage whose
    config has the sections it reads. A recipe changes a stage method (``build_model``, ``load_data``,
    ``make_batch``, ``loss``, ``preview``, ``save_final``, ``load_model``) by a method of the same name,
    ``hook(stage, then, *args)``: ``then(*args)`` is the stage's method as it is without this recipe (its
    own, through the recipes after this one in the stage's ``recipes``), and the hook does what it adds
    around that, or something else instead."""

    def sections(self, cls, sections: dict) -> dict:
        """The config's sections (a fine-tune's: with those of the run it starts from)."""
        return sections


def with_recipes(method: Callable) -> Callable:
    """A stage method that its ``recipes`` may change (see ``Recipe``); its body is the stage's own."""
    @functools.wraps(method)
    def changed(stage, *args, **kwargs):
        then = functools.partial(method, stage)
        for recipe in reversed(stage.recipes):
            if hasattr(recipe, method.__name__):
                then = functools.partial(getattr(recipe, method.__name__), stage, then)
        return then(*args, **kwargs)

    return changed


class DiffusionStage(Stage):
    """A stage that trains a denoising network and samples from it: a ``Space`` and a ``Condition``
    (see the module docstring), which it holds as ``stage.space`` and ``stage.condition``."""

    Space: type = Pixels  # where it diffuses
    Condition: type  # what it is conditioned on
    recipes: tuple[Recipe, ...] = ()  # how it trains other than from scratch on its data: a fine-tune's
    model_class: type  # UNet2DModel, UNet2DConditionModel: built by ``build_model``, loaded by ``load_model``

    def __init__(self, config):
        super().__init__(config)
        self.class_names = class_names_of(config.data)
        if config.data.class_names is None and config.data.source != "fashion_mnist":
            config.data.class_names = list(self.class_names)  # recorded in the run's config.yaml
        self.space = self.Space(config)
        self.condition = self.Condition(self)
        d = config.diffusion
        self.diffusion = Diffusion(d.objective, d.prediction_type, d.beta_schedule, d.num_train_timesteps,
                                   d.lognormal_noise, d.snr_gamma, d.sigma_data,
                                   clip_sample=self.space.data_range is not None, logit_normal=d.logit_normal,
                                   shift=d.shift)
        if config.sample.scheduler is None:
            config.sample.scheduler = USUAL_SAMPLER[d.objective]
        if config.sample.scheduler not in samplers_for(d.objective):
            raise UserError(f"sample.scheduler: {config.sample.scheduler} does not sample a network trained with "
                            f"diffusion.objective: {d.objective}; use {' or '.join(samplers_for(d.objective))}")
        self.scheduler = self.diffusion.scheduler  # diffusers' DDPMScheduler (flow: FlowMatchEulerDiscreteScheduler)
        self.guide_model = None  # autoguidance's weaker model: loaded with the run's (``load_model``)

    @classmethod
    def from_dict(cls, sections: dict) -> "DiffusionStage":
        for recipe in cls.recipes:
            sections = recipe.sections(cls, sections)
        return super().from_dict(sections)

    def network_args(self) -> dict:
        """The network's constructor arguments that come from the data and the condition, not the config."""
        channels, size, _ = self.space.sample_shape
        return dict(sample_size=size, in_channels=channels + self.condition.extra_channels, out_channels=channels,
                    **self.condition.network_args())

    def denoise(self, model, x_t: torch.Tensor, t: torch.Tensor, condition: NetworkInputs) -> torch.Tensor:
        """The conditioning hook: the network's output (eps or v, like x_t) for x_t at timesteps t."""
        extra = condition.get("concat")
        x = x_t if extra is None else torch.cat([x_t, extra], dim=1)
        return model(x, t, **{k: v for k, v in condition.items() if k != "concat"}).sample

    # -- training ---------------------------------------------------------------------

    @with_recipes
    def load_data(self) -> dict[str, torch.Tensor]:
        """The condition's data, then the space's: equal-length tensors."""
        extra = self.condition.load_data()
        return {**self.space.load_data(), **extra}

    @with_recipes
    def make_batch(self, raw: dict[str, torch.Tensor], generator: torch.Generator, step: int = 0
                   ) -> dict[str, torch.Tensor]:
        """x0 (B x ``sample_shape``), timesteps (B), noise (like x0) and the condition entries."""
        n, device = len(next(iter(raw.values()))), next(iter(raw.values())).device
        flip = torch.rand(n, generator=generator, device=device) < 0.5 if self.config.data.flip else None
        x0 = self.space.clean_sample(raw, flip)
        dropped = condition_dropout_mask(n, self.config.diffusion.p_uncond, generator, device)
        timesteps, noise = draw_timesteps_and_noise(x0, self.diffusion, generator)
        return {"x0": x0, "timesteps": timesteps, "noise": noise,
                **self.condition.batch_entries(raw, dropped, flip, generator)}

    @with_recipes
    def build_model(self):
        return self.model_class(**self.network_args(), **self.config.model)

    @with_recipes
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.example_losses(model, batch).mean()

    def example_losses(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoising loss of each example of a batch: float B."""
        x_t = noisy_sample(self.diffusion, batch["x0"], batch["noise"], batch["timesteps"])
        prediction = self.denoise(model, x_t, batch["timesteps"], self.condition.model_condition(batch))
        return diffusion_loss(self.diffusion, prediction, batch["x0"], batch["noise"], batch["timesteps"])

    # -- sampling ---------------------------------------------------------------------

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, condition: NetworkInputs | list[NetworkInputs],
                null: NetworkInputs, guidance: float, weights: list[float] | None = None) -> torch.Tensor:
        """The guided network output for x (B x ``sample_shape``) at timestep t:

            out = out(x, null) + w * (out(x, condition) - out(x, null))

        w = 1 needs only the conditional branch and w = 0 only the null one; otherwise both run
        as one batch of 2B. With a ``guide_model`` (autoguidance, ``sample.guide_with``) the model
        guides away from the weaker model's answer for the same condition instead:

            out = guide(x, condition) + w * (out(x, condition) - guide(x, condition))

        (with ``sample.guide_with_null``, guide(x, null): the weaker model's unconditional answer). With
        ``weights``, ``condition`` is a list of conditions composed as ``guide`` says, all K + 1 branches
        in one batch. Outside ``sample.guidance_interval`` a
        w > 1 becomes 1. With ``sample.clip_denoised`` and a ``data_range``, the result is
        re-expressed so that its clean-sample estimate stays in that range (``clip_denoised``).
        """
        interval = self.config.sample.guidance_interval
        if guidance > 1 and interval is not None and not interval[0] <= int(t) <= interval[1]:
            guidance = 1.0
        if guidance == 1 and weights is None:
            out = self.denoise(model, x, t, condition)
        elif self.guide_model is not None:
            if weights is not None:
                raise UserError("composed prompts are guided by the null condition; sample without sample.guide_with")
            weak = self.denoise(self.guide_model, x, t, null if self.config.sample.guide_with_null else condition)
            out = weak if guidance == 0 else guide(self.denoise(model, x, t, condition), weak, guidance)
        elif guidance == 0:
            out = self.denoise(model, x, t, null)
        else:
            branches = [*(condition if weights is not None else [condition]), null]
            stacked = {k: torch.cat([b[k] for b in branches]) for k in null}
            *cond, uncond = self.denoise(model, torch.cat([x] * len(branches)), t, stacked).chunk(len(branches))
            out = guide(cond if weights is not None else cond[0], uncond, guidance, weights)
        if self.config.sample.clip_denoised and self.space.data_range is not None:
            out = clip_denoised(self.diffusion, out, x, t, self.space.data_range)
        return out

    @torch.no_grad()
    def sample(self, model, condition: NetworkInputs | list[NetworkInputs], null: NetworkInputs, *,
               guidance: float | None = None, scheduler: str | None = None, steps: int | None = None,
               seed: int | None = None, batch_size: int = 500, progress: bool = False,
               init_images: torch.Tensor | None = None, strength: float = 1.0, on_step: Callable | None = None,
               weights: list[float] | None = None) -> torch.Tensor:
        """One image per entry of ``condition`` (and of ``null``, its CFG branch): uint8 N x 28 x 28.
        With ``weights``, ``condition`` is a list of conditions (N entries each), composed (``guide``).

        Unset settings come from the ``sample`` config. The same seed gives the same images;
        batches are seeded ``seed + batch index``. img2img: ``init_images`` (uint8 N x 28 x 28)
        are noised according to ``strength`` (see ``sample_loop``) instead of pure noise.
        ``on_step(i, n, t, x_t, x0_hat)`` watches each batch form: at step i of n (timestep t),
        the noisy sample and the clean sample the network predicts from it (B x ``sample_shape``;
        ``to_images`` shows them).
        """
        settings = self.sampling_settings(guidance=guidance, scheduler=scheduler, steps=steps, seed=seed)
        guidance, scheduler, steps, seed = (settings[k] for k in ("guidance", "scheduler", "steps", "seed"))
        check_request(strength=strength)
        device = next(model.parameters()).device
        model.eval()
        if self.guide_model is not None:
            self.guide_model.to(device).eval()
        sampler = make_sampler(scheduler, self.diffusion)
        n = len(next(iter(null.values())))
        out = []
        for i, index in enumerate(torch.arange(n).split(batch_size)):
            def rows(c: NetworkInputs) -> NetworkInputs:
                return {k: v[index].to(device) for k, v in c.items()}

            cond = [rows(c) for c in condition] if weights is not None else rows(condition)
            uncond = rows(null)
            generator = torch.Generator(device).manual_seed(seed + i)
            init = init_images[index].to(device) if init_images is not None else None
            noise, init, net_cond, net_uncond = self.condition.sampling_inputs(cond, uncond, init, generator)
            watch = None if on_step is None else (
                lambda i, n, t, x_t, out: on_step(i, n, t, x_t, predicted_x0(self.diffusion, out, x_t, t)))
            with _autocast(device):
                x0 = sample_loop(lambda x, t: self.predict(model, x, t, net_cond, net_uncond, guidance, weights),
                                 sampler, noise, steps, generator, progress=progress, init=init, strength=strength,
                                 on_step=watch, after_step=self.condition.after_step(cond, noise, sampler))
            out.append(self.space.to_images(x0).cpu())
        return torch.cat(out)

    def sampling_settings(self, *, guidance: float | None = None, scheduler: str | None = None,
                          steps: int | None = None, seed: int | None = None) -> dict:
        """The one place a sampling call's settings are resolved: those given, else the ``sample``
        config's (with a run's sampling overrides, ``sample.guidance=5``), checked."""
        s = self.config.sample
        settings = {"guidance": s.guidance if guidance is None else guidance, "scheduler": scheduler or s.scheduler,
                    "steps": steps or s.steps, "seed": s.seed if seed is None else seed}
        check_request(**settings)
        return settings

    def generate(self, model, labels: torch.Tensor, **settings) -> torch.Tensor:
        """One image per class label (int64 N) -> uint8 N x 28 x 28: the condition's ``generate``."""
        return self.condition.generate(model, labels, **settings)

    def generate_prompts(self, model, prompts: list[str], **settings) -> torch.Tensor:
        return self.condition.generate_prompts(model, prompts, **settings)

    def generate_rows(self, model, kind: str, rows: list[str], *, phrasings: str = "train", **settings) -> torch.Tensor:
        """A class's rows are its names (``generate``, with ``phrasings``), a prompt's its text."""
        if kind == "class":
            labels = torch.tensor([self.class_names.index(r) for r in rows], dtype=torch.long)
            return self.generate(model, labels, phrasings=phrasings, **settings)
        return self.generate_prompts(model, rows, **settings)

    def generate_composed(self, model, prompts: list[str], weights: list[float], n: int, **settings) -> torch.Tensor:
        return self.condition.generate_composed(model, prompts, weights, n, **settings)

    @with_recipes
    def preview(self, model, path: Path, title: str = "") -> Path:
        return self.condition.preview(model, path, title)

    def add_adapters(self, model, folder: Path):
        return self.condition.add_adapters(model, folder)

    def measure(self, name: str, model, scales: list[float | None], out_dir: Path, **settings) -> str:
        return self.condition.measure(name, model, scales, out_dir, **settings)

    def evaluate(self, model, n: int) -> dict:
        """The judge's metrics for n samples at the ``sample`` settings (for eval_every)."""
        return as_metrics(evaluate_model(self, model, n))

    # -- saving and loading -----------------------------------------------------------

    @with_recipes
    def save_final(self, model, folder: Path) -> None:
        """unet/ and scheduler/, and what the space and the condition add (vae/, text_encoder/)."""
        model.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.space.save(folder)
        self.condition.save(folder)

    @with_recipes
    def load_model(self, folder: Path):
        """The network from a ``final/`` folder (``unet/``) or a checkpoint (its EMA weights, ``ema/``);
        with ``sample.guide_with``, autoguidance's weaker model too (``guide_model``), from that folder
        (or the run's ``final/``) relative to the run directory."""
        self.space.load(folder)
        self.condition.load(folder)
        guide_with = self.config.sample.guide_with
        if guide_with is not None:
            weak = run_dir_of(folder) / guide_with
            self.guide_model = self._network(weak / "final" if (weak / "final").is_dir() else weak,
                                             f"sample.guide_with={guide_with}: ")
        return self._network(folder)

    def _network(self, folder: Path, what: str = ""):
        for sub in ("unet", "ema"):
            if (folder / sub / "config.json").is_file():
                return self.model_class.from_pretrained(folder / sub, use_safetensors=True)
        raise UserError(f"{what}{folder} holds no model (expected unet/ or ema/ inside)")


def _autocast(device: torch.device):
    """bf16 autocast on GPUs that have it; plain fp32 elsewhere."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
