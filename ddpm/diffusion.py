"""The maths of a denoising diffusion model, on top of diffusers' schedulers. Every function reads
the diffusion settings by name from a ``Diffusion`` (prediction type, schedule, loss weighting).

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

Flow matching (``objective="flow"``; rectified flow as Stable Diffusion 3 trains it, Esser et al. 2024)
keeps the network and changes the path and the target. With t in [0, 1] (the network is told 1000 t):

    x_t = (1 - t) x0 + t eps                  a straight line from the data (t = 0) to noise (t = 1)
    v   = dx_t/dt = eps - x0                  the velocity, which the network predicts
    x0_hat = x_t - t v_hat,  eps_hat = x_t + (1 - t) v_hat

t is drawn logit-normally (t = sigmoid(u), u ~ N(m, s^2); SD3: m = 0, s = 1) or uniformly, optionally
shifted toward noise, t' = shift t / (1 + (shift - 1) t) (SD3 eq. 23). Sampling integrates the ODE
dx/dt = v(x, t) from t = 1 to 0 (Euler, midpoint or Heun, ``FlowSampler``); a path is straight until the
network can tell which image it is heading for, and straight stretches cost Euler nothing. A flow run's
``scheduler/`` is diffusers' ``FlowMatchEulerDiscreteScheduler``, which diffusers' UNet pipelines
(``DDPMPipeline``, ``StableDiffusionPipeline``) do not drive; ``sample.py`` does.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from tqdm.auto import tqdm

from .errors import UserError

SAMPLERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    "edm-euler": (EDMEulerScheduler, {}),  # EDM's noise levels (Karras et al. 2022, eq. 5), see ``EDMSampler``
    "edm-dpm++": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),  # the flow objective's samplers, see ``FlowSampler``
    "flow-midpoint": (FlowMatchEulerDiscreteScheduler, {"midpoint": True}),  # second order: two calls a step
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {}),  # second order too, unstable near t = 0 (``FlowSampler``)
}

USUAL_SAMPLER = {"ddpm": "dpm++", "flow": "flow-midpoint"}  # what a run samples with unless its config says


def samplers_for(objective: str) -> list[str]:
    """The ``SAMPLERS`` that sample a network trained with this objective ("ddpm" or "flow")."""
    return [name for name in SAMPLERS if name.startswith("flow") == (objective == "flow")]


@dataclasses.dataclass
class Diffusion:
    """The diffusion settings by name, which the loss and the samplers read: what the network predicts, the
    noise schedule, how timesteps are drawn and the loss weighted. ``scheduler``, diffusers' ``DDPMScheduler``
    built from them, holds the schedule's abar_t (``alphas_cumprod``) and is saved for pipelines (a flow
    run's: ``FlowMatchEulerDiscreteScheduler``)."""

    objective: str = "ddpm"  # "ddpm": the variance-preserving path below; "flow": rectified flow (module docstring)
    prediction_type: str = "epsilon"  # what a DDPM network predicts: eps ("epsilon") or v ("v_prediction")
    beta_schedule: str = "linear"  # the noise schedule: "linear", "scaled_linear" or "squaredcos_cap_v2"
    num_train_timesteps: int = 1000  # T
    lognormal_noise: tuple[float, float] | None = None  # timesteps by ln sigma ~ N(P_mean, P_std^2); None: uniform
    snr_gamma: float | None = None  # the loss weighting: min-SNR-gamma,
    sigma_data: float | None = None  # or EDM's for data of this std; neither: plain MSE
    clip_sample: bool = False  # for pipelines that load the scheduler (our samplers use ``clip_denoised``)
    logit_normal: tuple[float, float] | None = None  # flow: t = sigmoid(u), u ~ N(m, s^2); None: t uniform
    shift: float = 1.0  # flow: t' = shift t / (1 + (shift - 1) t), in training and sampling

    def __post_init__(self):
        if self.objective == "flow":
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                                             shift=self.shift)
        else:
            self.scheduler = DDPMScheduler(num_train_timesteps=self.num_train_timesteps,
                                           beta_schedule=self.beta_schedule, prediction_type=self.prediction_type,
                                           clip_sample=self.clip_sample)

    @property
    def flow(self) -> bool:
        return self.objective == "flow"


def draw_timesteps_and_noise(x0: torch.Tensor, diffusion: Diffusion, generator: torch.Generator):
    """Timesteps (B, int64; flow: float 1000 t) and noise shaped like x0. The timesteps are uniform over
    *all* of 0..T-1 (DDPM), or, with ``lognormal_noise`` = (P_mean, P_std), those whose noise level sigma_t
    (``sigmas``) is nearest to a draw of ln sigma ~ N(P_mean, P_std^2) (EDM, Karras et al. 2022, table 1):
    most training then goes to the middle noise levels, where the samples' shapes are decided. Flow's
    t is logit-normal or uniform, then shifted (``flow_times``)."""
    n, lognormal = x0.shape[0], diffusion.lognormal_noise
    if diffusion.flow:
        t = flow_times(diffusion, n, generator, x0.device) * diffusion.num_train_timesteps
    elif lognormal is None:
        t = torch.randint(0, diffusion.num_train_timesteps, (n,), generator=generator, device=x0.device)
    else:
        log_sigma = lognormal[0] + lognormal[1] * torch.randn(n, generator=generator, device=x0.device)
        table = sigmas(diffusion).log().to(x0.device)
        t = torch.searchsorted(table, log_sigma).clamp(1, len(table) - 1)
        t = t - ((log_sigma - table[t - 1]) < (table[t] - log_sigma)).long()  # the nearer of the two neighbours
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return t, noise


def flow_times(diffusion: Diffusion, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n training times t in (0, 1) of the flow path: t = sigmoid(u), u ~ N(m, s^2) with ``logit_normal``
    = (m, s) (SD3, Esser et al. 2024, eq. 19: most training at the middle of the path, where the velocity
    is hardest to predict), else t ~ U(0, 1); then shifted toward noise by ``shift`` (eq. 23)."""
    if diffusion.logit_normal is None:
        t = torch.rand(n, generator=generator, device=device)
    else:
        m, s = diffusion.logit_normal
        t = torch.sigmoid(m + s * torch.randn(n, generator=generator, device=device))
    return diffusion.shift * t / (1 + (diffusion.shift - 1) * t)


def noisy_sample(diffusion: Diffusion, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for clean samples x0 (B x C x H x W), noise like them, at timesteps t (B): the forward process,
    sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM), or (1 - t) x0 + t eps for t = timestep / T (flow)."""
    if not diffusion.flow:
        return diffusion.scheduler.add_noise(x0, noise, t)
    s = _flow_time(diffusion, t, x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def _flow_time(diffusion: Diffusion, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The flow's t in [0, 1] of network timesteps t (a scalar or B), shaped to broadcast against ``like``."""
    s = torch.as_tensor(t, device=like.device).float() / diffusion.num_train_timesteps
    return s.reshape(-1, *[1] * (like.dim() - 1)) if s.dim() else s


def sigmas(diffusion: Diffusion) -> torch.Tensor:
    """The noise-to-signal ratio sigma_t = sqrt((1 - abar_t) / abar_t) of each training timestep (float T,
    rising: 0.01 to 157 for the linear schedule): x_t / sqrt(abar_t) = x0 + sigma_t eps, EDM's noisy sample."""
    abar = diffusion.scheduler.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt().float()


def condition_dropout_mask(batch_size: int, p_uncond: float, generator: torch.Generator,
                           device: torch.device) -> torch.Tensor:
    """Bool B: True (with probability ``p_uncond``) where the condition is replaced by the null one."""
    return torch.rand(batch_size, generator=generator, device=device) < p_uncond


def snr(diffusion: Diffusion, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps t (B)."""
    abar = diffusion.scheduler.alphas_cumprod.to(t.device)[t]
    return abar / (1 - abar)


def diffusion_loss(diffusion: Diffusion, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """MSE between the network's prediction and its target, per example: float B (the loss is
    their mean).

    With ``diffusion.snr_gamma`` (min-SNR-gamma, Hang et al. 2023), low-noise timesteps, whose
    targets are easy and whose gradients would dominate, are weighted down to
    min(SNR, gamma) / SNR for eps-prediction (/ (SNR + 1) for v-prediction).

    With ``diffusion.sigma_data`` (the data's std), EDM's weighting (Karras et al. 2022, eq. 8 and table 1):
    lambda(sigma) ||x0_hat - x0||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    which makes the loss of EDM's preconditioned network F uniform over noise levels. A VP network's
    clean-sample error is sigma times its eps error (x0_hat = x_t / a - sigma eps_hat) and b times
    its v error (x0_hat = a x_t - b v_hat; b^2 = sigma^2 / (1 + sigma^2)), so lambda becomes the weight
    (sigma^2 + sigma_data^2) / sigma_data^2 on the eps MSE, and that divided by (1 + sigma^2) on the v MSE.
    For sigma_data = 1 the v MSE is EDM's loss unweighted: v-prediction *is* EDM's preconditioning
    (c_in, c_skip, c_out) for data of unit std, with the timestep t as c_noise.

    Flow predicts the velocity eps - x0. Its MSE is the clean-sample MSE divided by t^2
    (x0_hat = x_t - t v_hat); with ``snr_gamma``, min-SNR weights that clean-sample MSE by min(SNR, gamma)
    for the flow's SNR = ((1 - t) / t)^2, which is min((1 - t)^2, gamma t^2) on the velocity MSE.
    """
    if diffusion.flow:
        per_sample = F.mse_loss(prediction.float(), (noise - x0).float(), reduction="none").flatten(1).mean(1)
        if diffusion.snr_gamma is None:
            return per_sample
        s = t.float() / diffusion.num_train_timesteps
        return per_sample * torch.minimum((1 - s) ** 2, diffusion.snr_gamma * s**2)
    eps = diffusion.prediction_type == "epsilon"
    target = noise if eps else diffusion.scheduler.get_velocity(x0, noise, t)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    sigma_data, snr_gamma = diffusion.sigma_data, diffusion.snr_gamma
    if sigma_data is not None:
        sigma2 = 1 / snr(diffusion, t)
        weight = (sigma2 + sigma_data**2) / sigma_data**2
        return per_sample * (weight if eps else weight / (1 + sigma2))
    if snr_gamma is None:
        return per_sample
    s = snr(diffusion, t)
    weight = s.clamp(max=snr_gamma) / (s if eps else s + 1)
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


def clip_denoised(diffusion: Diffusion, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  limit: float = 1.0) -> torch.Tensor:
    """The network output (eps or v, like x_t) re-expressed so that its clean-sample estimate
    x0_hat lies in [-limit, limit]. x_t is the variance-preserving noisy sample at the training
    timestep t (a scalar; what ``scale_model_input`` hands the network). With a = sqrt(abar_t),
    b = sqrt(1 - abar_t):

        eps:  x0_hat = (x_t - b eps) / a         v:  x0_hat = a x_t - b v
        eps' = (x_t - a clip(x0_hat)) / b        v' = a eps' - b clip(x0_hat)

    Flow, at t = timestep / T:  x0_hat = x_t - t v,  v' = (x_t - clip(x0_hat)) / t.
    """
    if diffusion.flow:
        s = _flow_time(diffusion, t, x_t)
        return (x_t.float() - predicted_x0(diffusion, output, x_t, t).clamp(-limit, limit)) / s
    a, b = _signal_and_noise_scales(diffusion, t, x_t.device)
    x0 = predicted_x0(diffusion, output, x_t, t).clamp(-limit, limit)
    eps = (x_t.float() - a * x0) / b
    return eps if diffusion.prediction_type == "epsilon" else a * eps - b * x0


def predicted_x0(diffusion: Diffusion, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The network's estimate of the clean sample, x0_hat (float, like x_t), from its output
    (eps or v) for the variance-preserving x_t at training timestep t (see ``clip_denoised``); flow's
    x0_hat = x_t - t v."""
    if diffusion.flow:
        return x_t.float() - _flow_time(diffusion, t, x_t) * output.float()
    a, b = _signal_and_noise_scales(diffusion, t, x_t.device)
    if diffusion.prediction_type == "epsilon":
        return (x_t.float() - b * output.float()) / a
    return a * x_t.float() - b * output.float()


def _signal_and_noise_scales(diffusion: Diffusion, t: torch.Tensor, device: torch.device):
    """sqrt(abar_t) and sqrt(1 - abar_t) at timestep t, which may lie between training timesteps (Euler's
    and the EDM samplers' do): 1 / sqrt(1 + sigma^2) and sigma / sqrt(1 + sigma^2), ln sigma interpolated."""
    table = sigmas(diffusion).log()
    sigma = _interpolate(torch.as_tensor(t, dtype=torch.float32).cpu(), torch.arange(len(table)), table).exp()
    a = (1 + sigma**2).rsqrt()
    return a.to(device), (sigma * a).to(device)


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through (xp, fp) (xp rising) at x, held constant outside xp's range."""
    x = x.clamp(xp[0], xp[-1]).float()
    i = torch.searchsorted(xp.float(), x).clamp(1, len(xp) - 1)
    left, right = xp[i - 1].float(), xp[i].float()
    return fp[i - 1] + (x - left) / (right - left) * (fp[i] - fp[i - 1])


def make_sampler(name: str, diffusion: Diffusion):
    """A sampling scheduler sharing the training noise schedule and prediction type.

    "trailing" spacing makes few-step samplers start at t = T-1, pure noise, as training
    expects (Lin et al. 2023), instead of part-way down the schedule. The schedulers' own
    clipping is off: ``clip_denoised`` does it, the same way for every sampler. The EDM samplers
    step through EDM's noise levels between the schedule's sigma_0 and sigma_{T-1} (``EDMSampler``).
    """
    cls, extra = SAMPLERS[name]
    if name not in samplers_for(diffusion.objective):
        raise UserError(f"a network trained with diffusion.objective: {diffusion.objective} samples with "
                        f"{' or '.join(samplers_for(diffusion.objective))}, not {name}")
    if diffusion.flow:
        return FlowSampler(cls.from_config(diffusion.scheduler.config), diffusion, **extra)
    if name.startswith("edm"):
        table = sigmas(diffusion)
        edm = cls(sigma_min=float(table[0]), sigma_max=float(table[-1]), sigma_data=1.0, prediction_type="v_prediction",
                  num_train_timesteps=diffusion.num_train_timesteps, **extra)
        return EDMSampler(edm, diffusion)
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        extra = {**extra, "clip_sample": False}
    return cls.from_config(diffusion.scheduler.config, timestep_spacing="trailing", **extra)


class EDMSampler:
    """One of diffusers' EDM schedulers (Karras et al. 2022) driving a network trained on our discrete VP
    schedule, with the interface ``sample_loop`` uses. The EDM scheduler steps x = x0 + sigma eps through
    its own noise levels (by default rho = 7: sigma_i^(1/7) evenly spaced, many steps at low noise), and
    preconditions: the network sees c_in x, at time c_noise(sigma), and its output F gives
    x0_hat = c_skip x + c_out F. With sigma_data = 1, c_in x = x / sqrt(1 + sigma^2) is exactly the VP sample
    x_t at the timestep whose sigma_t = sigma, and c_skip, c_out make F the VP v-prediction. So here the
    network is asked at that (fractional) training timestep t, and its eps, if it predicts eps, is
    re-expressed as v = eps sqrt(1 + sigma^2) - sigma x_t. ``timesteps`` are training timesteps.
    """

    def __init__(self, edm, diffusion: Diffusion):
        self.edm, self.prediction_type = edm, diffusion.prediction_type
        self.log_sigmas = sigmas(diffusion).log()

    @property
    def init_noise_sigma(self):
        return self.edm.init_noise_sigma

    def set_timesteps(self, steps: int, device=None) -> None:
        self.edm.set_timesteps(steps, device=device)
        sigma = self.edm.sigmas[:-1].float().cpu()
        self.timesteps = _interpolate(sigma.log(), self.log_sigmas, torch.arange(len(self.log_sigmas)).float())

    def set_begin_index(self, index: int) -> None:
        self.edm.set_begin_index(index)

    def _index(self, t: torch.Tensor) -> int:
        """Which of the ``timesteps`` t is."""
        return int((self.timesteps - torch.as_tensor(t).cpu().float()).abs().argmin())

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.edm.scale_model_input(x, self.edm.timesteps[self._index(t)])

    def step(self, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generator=None):
        index = self._index(t)
        if self.prediction_type == "epsilon":
            sigma = self.edm.sigmas[index].to(x.device)
            output = output * (1 + sigma**2).sqrt() - sigma * x / (1 + sigma**2).sqrt()  # x / sqrt(1 + sigma^2) = x_t
        return self.edm.step(output, self.edm.timesteps[index], x, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.edm.add_noise(x0, noise, self.edm.timesteps[[self._index(s) for s in t.reshape(-1)]])


class FlowSampler:
    """One of diffusers' flow-matching schedulers, with the interface ``sample_loop`` uses. Its times
    t_0 = 1 > t_1 > ... > t_N = 0 are evenly spaced (then shifted); each step integrates dx/dt = v:

        Euler:     x <- x + (t_next - t) v(x, t)
        midpoint:  x <- x + (t_next - t) v(x + (t_mid - t) v(x, t), t_mid),   t_mid = (t + t_next) / 2
        Heun:      x <- x + (t_next - t) (v(x, t) + v(x_euler, t_next)) / 2

    The second-order steps ask the network twice (``timesteps`` lists the two times of each step). Heun's
    second call at the last inner time (t = 0.001) multiplies the stiffness of the velocity near the data
    (dv/dx ~ 1/t) into the sample, which overshoots in directions where the data hardly varies; the
    midpoint never asks that close to t = 0 (tests/test_flow.py). The network sees x_t itself (no input
    scaling) at timestep 1000 t; img2img noises its start along the straight path (``noisy_sample``)."""

    init_noise_sigma = 1.0  # x_1 = eps: pure noise

    def __init__(self, flow, diffusion: Diffusion, midpoint: bool = False):
        self.flow, self.diffusion, self.midpoint = flow, diffusion, midpoint
        self.order = 2 if midpoint else flow.order  # network calls per step

    def set_timesteps(self, steps: int, device=None) -> None:
        self.flow.set_timesteps(steps, device=device)
        self.timesteps, self._index = self.flow.timesteps, 0
        if self.midpoint:
            t = self.flow.sigmas  # t_0 .. t_N, ending at 0
            self.times = torch.stack([t[:-1], (t[:-1] + t[1:]) / 2], dim=1).flatten()  # t_0, mid_0, t_1, ...
            self.timesteps = self.times * self.diffusion.num_train_timesteps

    def set_begin_index(self, index: int) -> None:
        self._index = index
        if not self.midpoint:
            self.flow.set_begin_index(index)

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def step(self, output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generator=None) -> SchedulerOutput:
        if not self.midpoint:
            return self.flow.step(output, t, x, generator=generator)
        i, self._index = self._index, self._index + 1
        t_now, t_next = self.flow.sigmas[i // 2], self.flow.sigmas[i // 2 + 1]
        if i % 2 == 0:  # to the midpoint, with v(x, t)
            self._start = x
            return SchedulerOutput((x.float() + (t_next - t_now) / 2 * output.float()).to(x.dtype))
        return SchedulerOutput((self._start.float() + (t_next - t_now) * output.float()).to(x.dtype))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noisy_sample(self.diffusion, x0, noise, t)


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
    first = skipped * getattr(scheduler, "order", 1)  # Heun lists each inner timestep twice
    if skipped == 0:
        x = noise * scheduler.init_noise_sigma
    else:
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        x = scheduler.add_noise(init, noise, scheduler.timesteps[first].repeat(len(init)))
    timesteps = scheduler.timesteps[first:]
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(x, t)
        output = predict(model_input, t)
        if on_step is not None:
            on_step(i, len(timesteps), t, model_input, output)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
        if after_step is not None:
            x = after_step(timesteps[i + 1] if i + 1 < len(timesteps) else None, x)
    return x
