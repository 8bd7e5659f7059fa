"""The maths of a denoising diffusion model, on top of diffusers' schedulers.

Forward (noising) process, in closed form for any timestep t in 0..T-1:

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,     eps ~ N(0, I)

where abar_t = prod_{s<=t} (1 - beta_s) falls from ~1 (t = 0, almost clean) to ~0
(t = T-1, almost pure noise). The network sees (x_t, t, condition) and predicts eps
("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v_prediction"); the loss is
the mean squared error, optionally weighted per timestep by min-SNR-gamma.

Classifier-free guidance (CFG): one network, trained with the condition sometimes replaced
by a *null* condition, predicts both eps(x, t, c) and eps(x, t, null); sampling mixes them

    eps = eps_uncond + w * (eps_cond - eps_uncond)

so w = 0 is unconditional, w = 1 plain conditional, and w > 1 pushes harder toward c.

Sampling: every step of every sampler starts from the network's estimate of the clean sample,

    x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t)

At high noise sqrt(abar_t) is tiny (0.006 at t = 999), so a small error in eps_hat, which
guidance multiplies by w, puts x0_hat far outside the data's range. For data with a known range
(pixels in [-1, 1]) we clip x0_hat to it and re-express the network output from the clipped
x0_hat (``clip_denoised``, as improved-diffusion's ``clip_denoised``), so that every sampler
steps from a consistent (x0_hat, eps_hat) pair. Clipping x0_hat alone, as diffusers' DDIM does
with ``clip_sample`` while keeping the unclipped eps_hat, makes guided DDIM steer toward
saturated blocks; not clipping at all leaves overshooting pixels in the result as speckle.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from tqdm.auto import tqdm

SAMPLERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
}


def draw_timesteps_and_noise(x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator):
    """Timesteps uniform over *all* of 0..T-1 (B, int64) and noise shaped like x0."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise


def condition_dropout_mask(batch_size: int, p_uncond: float, generator: torch.Generator,
                           device: torch.device) -> torch.Tensor:
    """Bool B: True (with probability ``p_uncond``) where the condition is replaced by the null one."""
    return torch.rand(batch_size, generator=generator, device=device) < p_uncond


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t (B)."""
    abar = scheduler.alphas_cumprod.to(t.device)[t]
    return abar / (1 - abar)


def diffusion_loss(scheduler: DDPMScheduler, prediction: torch.Tensor, x0: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """MSE between the network's prediction and its target, per example: float B (the loss is
    their mean).

    With ``snr_gamma`` (min-SNR-gamma, Hang et al. 2023), low-noise timesteps, whose
    targets are easy and whose gradients would dominate, are weighted down to
    min(SNR, gamma) / SNR for eps-prediction (/ (SNR + 1) for v-prediction).
    """
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(x0, noise, t)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    if snr_gamma is None:
        return per_sample
    s = snr(scheduler, t)
    weight = s.clamp(max=snr_gamma) / (s if scheduler.config.prediction_type == "epsilon" else s + 1)
    return per_sample * weight


def guide(cond: torch.Tensor | list[torch.Tensor], uncond: torch.Tensor, guidance: float,
          weights: list[float] | None = None) -> torch.Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond).

    Composed (Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion
    Models"): several conditional outputs ``cond`` (a list), one per prompt, each pulling with
    its weight, uncond + w * sum_k weight_k (cond_k - uncond); a negative weight pushes away.
    """
    if weights is None:
        return uncond + guidance * (cond - uncond)
    return uncond + guidance * sum(weight * (c - uncond) for weight, c in zip(weights, cond))


def clip_denoised(scheduler: DDPMScheduler, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  limit: float = 1.0) -> torch.Tensor:
    """The network output (eps or v, like x_t) re-expressed so that its clean-sample estimate
    x0_hat lies in [-limit, limit]. x_t is the variance-preserving noisy sample at the training
    timestep t (a scalar; what ``scale_model_input`` hands the network). With a = sqrt(abar_t),
    b = sqrt(1 - abar_t):

        eps:  x0_hat = (x_t - b eps) / a         v:  x0_hat = a x_t - b v
        eps' = (x_t - a clip(x0_hat)) / b        v' = a eps' - b clip(x0_hat)
    """
    a, b = _signal_and_noise_scales(scheduler, t, x_t.device)
    x0 = predicted_x0(scheduler, output, x_t, t).clamp(-limit, limit)
    eps = (x_t.float() - a * x0) / b
    return eps if scheduler.config.prediction_type == "epsilon" else a * eps - b * x0


def predicted_x0(scheduler: DDPMScheduler, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's estimate of the clean sample, x0_hat (float, like x_t), from its output
    (eps or v) for the variance-preserving x_t at training timestep t (see ``clip_denoised``)."""
    a, b = _signal_and_noise_scales(scheduler, t, x_t.device)
    if scheduler.config.prediction_type == "epsilon":
        return (x_t.float() - b * output.float()) / a
    return a * x_t.float() - b * output.float()


def _signal_and_noise_scales(scheduler: DDPMScheduler, t: torch.Tensor, device: torch.device):
    """sqrt(abar_t) and sqrt(1 - abar_t) at timestep t (rounded: Euler's timesteps are floats)."""
    abar = scheduler.alphas_cumprod[int(torch.as_tensor(t).round())].to(device, torch.float32)
    return abar.sqrt(), (1 - abar).sqrt()


def make_sampler(name: str, train_scheduler: DDPMScheduler):
    """A sampling scheduler sharing the training noise schedule and prediction type.

    "trailing" spacing makes few-step samplers start at t = T-1, pure noise, as training
    expects (Lin et al. 2023), instead of part-way down the schedule. The schedulers' own
    clipping is off: ``clip_denoised`` does it, the same way for every sampler.
    """
    cls, extra = SAMPLERS[name]
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        extra = {**extra, "clip_sample": False}
    return cls.from_config(train_scheduler.config, timestep_spacing="trailing", **extra)


@torch.no_grad()
def sample_loop(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler,
                noise: torch.Tensor, steps: int, generator: torch.Generator | None = None,
                progress: bool = False, init: torch.Tensor | None = None, strength: float = 1.0,
                on_step: Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                after_step: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """Run a scheduler from noise to x0.

    predict(x_t, t) -> the (guided) network output, same shape as x_t.
    noise: B x C x H x W standard normal. Returns the final sample, same shape.
    img2img: ``init`` (a clean x0, like noise) is noised to the timestep a fraction ``strength``
    of the way up the schedule, and only the last round(strength x steps) steps run: strength 1
    starts from pure noise (text-to-image), strength 0 returns ``init`` unchanged.
    on_step(i, n, t, x_t, output), after the network's output at step i of the n that run: to
    watch the sample form (x_t is what the network saw, the variance-preserving noisy sample).
    after_step(t_next, x) replaces the sample x after each step; t_next is the timestep x is now at,
    None after the last step (inpainting puts the known region back, noised to t_next).
    """
    scheduler.set_timesteps(steps, device=noise.device)
    skipped = steps - round(steps * strength) if init is not None else 0
    if skipped == steps:
        return init
    if skipped == 0:
        x = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skipped)
        x = scheduler.add_noise(init, noise, scheduler.timesteps[skipped].repeat(len(init)))
    timesteps = scheduler.timesteps[skipped:]
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(x, t)
        output = predict(model_input, t)
        if on_step is not None:
            on_step(i, len(timesteps), t, model_input, output)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
        if after_step is not None:
            x = after_step(timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x
