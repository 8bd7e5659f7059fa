"""Exact tests of the samplers: sample Gaussian "data" with the best possible model.

Why Gaussian data? If x0 ~ N(mu, diag(s^2)) then x_t = a x0 + b eps (a = sqrt(abar_t),
b = sqrt(1 - abar_t)) is Gaussian too, and the best network there can be, the one the
diffusion loss trains toward (the minimum mean-squared-error predictor), is known in closed
form. It is the mean of the Gaussian posterior of x0 given x_t (Tweedie's formula
E[x0 | x_t] = (x_t + b^2 grad log p_t(x_t)) / a gives the same), per dimension:

    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) * (x_t - a mu)
    eps_hat     = (x_t - a E[x0 | x_t]) / b  =  b (x_t - a mu) / (a^2 s^2 + b^2)
    v_hat       = a eps_hat - b E[x0 | x_t]

We use it as the "model" (no network, no training, microseconds a call) and check that each
sampler of ``ddpm.diffusion``, wired the way ``make_sampler`` and ``sample_loop`` wire it:

- turns noise into samples with the data's mean and spread (DDPM 1000 steps, DDIM 50 and 10,
  DPM-Solver++ 20 and 10, Euler 50 and 20; eps and v prediction);
- hands the model what training showed it: the training timestep t, starting at T-1, and x
  distributed like the noised data x_t at that t;
- with classifier-free guidance, samples the Gaussian that guidance predicts.

What exactly should come out? Every sampler here ends on the same kind of step: it returns the
model's estimate E[x0 | x_t] at its last timestep t_last (T/steps - 1 with "trailing" spacing:
19 for 50 steps, 99 for 10; 0 for DDPM's 1000). That estimate is an average over what x0 could
be, so it is narrower than the data: its std is s * s / sqrt(s^2 + sigma^2), where
sigma^2 = (1 - abar) / abar is the noise-to-signal ratio at t_last. Detail finer than the last
noise level is averaged away (sigma = 0.34 at t = 99: with 10 steps a std of 0.05 comes out as
0.007). This is why few-step samples lose fine texture. A perfect solver down to t_last would
give exactly these moments, so the tests expect them and the tolerances only cover each
solver's own error (they are listed next to TOLERANCE below, with the errors measured).

Sampling error: the starting noise is standardised so that its sample mean is exactly 0 and its
sample covariance exactly I. The optimal model is linear in x_t, so DDIM, DPM-Solver++ and Euler
(deterministic) are affine maps of the noise, and the sample mean and covariance of their
output are exactly those of their output distribution: no sampling error, only discretisation
error. DDPM draws fresh noise at every step, so it keeps a sampling error of 1/sqrt(N) of a std
on the mean and 1/sqrt(2N) on the std (N = 16384: 0.008 and 0.006).

Data well inside [-1, 1] (|mu| + 4 s <= 1), so that a pixel stage's ``clip_denoised`` would never
act on it either (``make_sampler`` turns the schedulers' own ``clip_sample`` off).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm.diffusion import Diffusion, guide, make_sampler, sample_loop

T = 1000  # training timesteps
SHAPE = (2, 2, 2)  # one "image": C x H x W, eight independent dimensions
MU = torch.tensor([0.5, -0.6, 0.3, -0.2, 0.4, -0.3, 0.15, 0.0], dtype=torch.float64)
STD = torch.tensor([0.003, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25], dtype=torch.float64)

# Allowed errors, in units of the expected std of each dimension (largest errors measured with
# diffusers 0.42 in brackets; eps and v prediction give the same numbers, the model being the
# same function):
#   mean: the schedule stops at abar_999 = 4e-5, not 0, so true x_999 has mean sqrt(abar) mu,
#         not the 0 the samplers start from; that shifts every result by 0.0064 mu stds
#         [0.004]. DDPM adds its sampling error, 0.008 for N = 16384: 5 standard errors.
#   std:  relative error. DPM-Solver++ (second order) [2.2%, 10 steps]; DDIM and Euler
#         (first order; with eta = 0 and no churn they are the same method, Euler's method on
#         the probability-flow ODE, and give identical samples) are too narrow by [8.3% at 20
#         steps, 7.3% at 50]; DDPM's ancestral step (variance "fixed_small") ignores the model's
#         uncertainty about x0, which makes narrow data too narrow even with 1000 steps [7.9%,
#         with sampling error].
#   corr: the dimensions are independent; the deterministic samplers keep them so up to float32
#         rounding [4e-5], DDPM up to sampling error (1/sqrt(N) = 0.008; [0.033] over the
#         inputs of its 1000 model calls).
#   EDM's samplers (Karras noise levels from sigma_999 = 157 down to sigma_0 = 0.01, then one step to 0) end at
#         t = 0, so the expected std is the data's own, which is harder to hit: Euler 50 [7.8% narrow], DPM-Solver++
#         20 [5.8%; 22.6% at 10 steps, not tested]. Their few steps at high noise (rho = 7) cost accuracy there.
# The narrowest dimensions (std 0.003 to 0.03) make the tests sharp: there the optimal eps
# depends steeply on the noise level, and a model given t + 1 or t - 1 instead of t already
# moves their std by 20% (DDPM) to 100 times (DDIM, 10 steps).
TOLERANCE = {  # sampler: (mean, std, correlation)
    "ddpm": (0.04, 0.12, 0.06),
    "ddim": (0.02, 0.12, 1e-3),
    "euler": (0.02, 0.12, 1e-3),
    "dpm++": (0.02, 0.05, 1e-3),
    "edm-euler": (0.02, 0.12, 1e-3),
    "edm-dpm++": (0.02, 0.08, 1e-3),
}
SAMPLES = {"ddpm": 16384}  # the stochastic sampler needs many; the others 4096 (any N is exact)
USUAL = [("ddpm", 1000), ("ddim", 50), ("dpm++", 20), ("euler", 50), ("edm-euler", 50), ("edm-dpm++", 20)]
FEW = [("ddim", 10), ("dpm++", 10), ("euler", 20)]
PREDICTIONS = ["epsilon", "v_prediction"]


def train_scheduler(prediction_type: str) -> DDPMScheduler:
    """The training schedule every stage uses: linear betas over 1000 steps."""
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type=prediction_type)


def optimal_model(scheduler: DDPMScheduler, mu: torch.Tensor, std: torch.Tensor):
    """predict(x_t, t) of the MMSE model for N(mu, diag(std^2)) data, in the scheduler's
    prediction type. t is the training timestep index (0-d tensor) the sampler passes."""
    abar_table = scheduler.alphas_cumprod.double()

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert 0 <= float(t) <= T - 1, f"not within the training timesteps: {t}"
        abar = abar_at(abar_table, float(t))
        a, b = abar.sqrt(), (1 - abar).sqrt()
        xt = x.reshape(len(x), -1).double()
        eps = b * (xt - a * mu) / (abar * std**2 + b * b)
        if scheduler.config.prediction_type == "epsilon":
            out = eps
        else:
            x0 = (xt - b * eps) / a  # = E[x0 | x_t]
            out = a * eps - b * x0
        return out.to(x.dtype).reshape(x.shape)

    return predict


def abar_at(abar_table: torch.Tensor, t: float) -> torch.Tensor:
    """abar at a training timestep, or between two (the EDM samplers' noise levels fall between them): the
    noise-to-signal ratio sigma^2 = (1 - abar) / abar with ln sigma linear in t between the table's entries."""
    if t == round(t):
        return abar_table[int(t)]
    log_sigma = np.log((1 - abar_table.numpy()) / abar_table.numpy()) / 2
    sigma = np.exp(np.interp(t, np.arange(len(log_sigma)), log_sigma))
    return torch.tensor(1 / (1 + sigma**2), dtype=torch.float64)


def edm_timesteps(abar_table: torch.Tensor, steps: int, rho: float = 7.0) -> list[float]:
    """The training timesteps of EDM's noise levels (Karras et al. 2022, eq. 5) from sigma_{T-1} down to
    sigma_0: sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    log_sigma = np.log((1 - abar_table.numpy()) / abar_table.numpy()) / 2
    lo, hi = np.exp(log_sigma[0]) ** (1 / rho), np.exp(log_sigma[-1]) ** (1 / rho)
    levels = (hi + np.arange(steps) / (steps - 1) * (lo - hi)) ** rho
    return list(np.interp(np.log(levels), log_sigma, np.arange(len(log_sigma))))


def standard_noise(n: int, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    """n draws of N(0, I), shifted and whitened so the sample mean is exactly 0 and the sample
    covariance exactly I (then only the sampler, not the draw, can be off)."""
    z = torch.randn(n, torch.Size(shape).numel(), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return z.float().reshape(n, *shape)


def last_timestep(steps: int, name: str = "") -> int:
    """The last training timestep the model sees: T/steps - 1 with "trailing" spacing; 0, sigma_min, for the
    EDM samplers."""
    return 0 if name.startswith("edm") else T // steps - 1


def trailing_timesteps(steps: int) -> list[int]:
    """T-1 (pure noise, where training starts), then down by T/steps: 999, 979, ..., 19 for 50."""
    return [T - 1 - k * (T // steps) for k in range(steps)]


def expected_std(scheduler: DDPMScheduler, std: torch.Tensor, steps: int, name: str = "") -> torch.Tensor:
    """The std of E[x0 | x_t] at the last timestep: std^2 / sqrt(std^2 + sigma^2)."""
    abar = scheduler.alphas_cumprod.double()[last_timestep(steps, name)]
    sigma2 = (1 - abar) / abar
    return std * std / (std**2 + sigma2).sqrt()


def moment_errors(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[float, float, float]:
    """Largest errors of the samples x (N x ...) over dimensions: mean (in stds), relative std,
    and off-diagonal correlation."""
    assert torch.isfinite(x).all(), "the sampler produced NaN or infinite values"
    x = x.reshape(len(x), -1).double()
    mean_err = ((x.mean(0) - mean) / std).abs().max().item()
    std_err = (x.std(0) / std - 1).abs().max().item()
    corr = torch.corrcoef(x.T)
    corr_err = (corr - torch.eye(len(corr), dtype=corr.dtype)).abs().max().item()
    return mean_err, std_err, corr_err


def check(name: str, errors: tuple[float, float, float]) -> None:
    """Assert the errors of ``moment_errors`` are within the sampler's TOLERANCE."""
    mean_tol, std_tol, corr_tol = TOLERANCE[name]
    mean_err, std_err, corr_err = errors
    assert mean_err <= mean_tol, f"mean off by {mean_err:.4f} std (tolerance {mean_tol})"
    assert std_err <= std_tol, f"std off by {100 * std_err:.2f}% (tolerance {100 * std_tol:.0f}%)"
    assert corr_err <= corr_tol, f"correlation {corr_err:.4f} between independent dimensions (tolerance {corr_tol})"


def run_sampler(name: str, steps: int, scheduler: DDPMScheduler, predict, shape=SHAPE) -> torch.Tensor:
    n = SAMPLES.get(name, 4096)
    c = scheduler.config
    sampler = make_sampler(name, Diffusion(prediction_type=c.prediction_type, beta_schedule=c.beta_schedule,
                                           num_train_timesteps=c.num_train_timesteps))
    return sample_loop(predict, sampler, standard_noise(n, shape), steps, generator=torch.Generator().manual_seed(1))


def param_id(name: str, steps: int, *rest) -> str:
    return "-".join([name, str(steps), *map(str, rest)])


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name,steps", [pytest.param(n, s, id=param_id(n, s)) for n, s in USUAL + FEW])
def test_sampler_reproduces_gaussian_data(name, steps, prediction_type):
    """With the optimal model, samples have mean mu and the std of E[x0 | x_t_last] (module docstring)."""
    scheduler = train_scheduler(prediction_type)
    x = run_sampler(name, steps, scheduler, optimal_model(scheduler, MU, STD))
    check(name, moment_errors(x, MU, expected_std(scheduler, STD, steps, name)))


@pytest.mark.parametrize("name,steps", [pytest.param(n, s, id=param_id(n, s)) for n, s in USUAL + FEW])
def test_model_sees_training_timesteps_and_noised_data(name, steps):
    """What the network is given: the training timestep index t, on the trailing grid
    (T-1 first, where training saw pure noise), and x distributed like the training inputs
    x_t = a x0 + b eps at that t. This holds for Euler too: it works with x0 + sigma eps = x_t / a,
    and scale_model_input divides by sqrt(sigma^2 + 1) = 1 / a, giving back x_t."""
    scheduler = train_scheduler("epsilon")
    model = optimal_model(scheduler, MU, STD)
    abar_table = scheduler.alphas_cumprod.double()
    seen = []

    def predict(x, t):
        abar = abar_at(abar_table, float(t))
        noised_std = (abar * STD**2 + 1 - abar).sqrt()
        seen.append((float(t), moment_errors(x, abar.sqrt() * MU, noised_std)))
        return model(x, t)

    run_sampler(name, steps, scheduler, predict)
    timesteps = [t for t, _ in seen]
    expected = edm_timesteps(abar_table, steps) if name.startswith("edm") else trailing_timesteps(steps)
    assert np.allclose(timesteps, expected, atol=1e-3), (
        f"model called at t = {timesteps[:2]} ... {timesteps[-2:]} ({len(timesteps)} calls), "
        f"expected {expected[:2]} ... {expected[-2:]} ({steps})")
    first_mean_err, first_std_err, _ = seen[0][1]
    assert first_mean_err < 0.01 and first_std_err < 1e-3, "the first input is not the unit noise of t = T-1"
    for t, errors in seen:
        try:
            check(name, errors)
        except AssertionError as e:
            raise AssertionError(f"model input at t = {t:g}: {e}") from None


# Classifier-free guidance. Two conditions with the same covariance: cond N(MU_C, S) and
# uncond N(MU_U, S). Their noised versions share the covariance a^2 S + b^2 I, so eps_hat, which
# is b times minus the score, is linear in mu, and the guided
#     uncond + w (cond - uncond)
# is exactly the optimal eps_hat for N(MU_U + w (MU_C - MU_U), S), at every t. Guided sampling
# must then produce that Gaussian: mean moved w times the gap, spread unchanged. (The same holds
# for v_hat, also linear in mu.) w = 0 is unconditional, w = 1 conditional, w = 3 extrapolates.
GUIDED_SHAPE = (4, 1, 1)  # the other layout: channels
MU_U = torch.tensor([0.2, -0.1, 0.0, 0.0], dtype=torch.float64)
MU_C = torch.tensor([0.3, -0.2, 0.1, -0.05], dtype=torch.float64)  # at w = 3: 0.5, -0.4, 0.3, -0.15
GUIDED_STD = torch.tensor([0.01, 0.05, 0.1, 0.2], dtype=torch.float64)  # gap = 10, 2, 1, 0.25 stds


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("name,steps", [pytest.param(n, s, id=param_id(n, s))
                                        for n, s in [("ddim", 50), ("dpm++", 20), ("dpm++", 10)]])
def test_guidance_samples_the_shifted_gaussian(name, steps, w, prediction_type):
    """guide(cond, uncond, w) of two optimal models samples N(mu_u + w (mu_c - mu_u), S)."""
    scheduler = train_scheduler(prediction_type)
    cond = optimal_model(scheduler, MU_C, GUIDED_STD)
    uncond = optimal_model(scheduler, MU_U, GUIDED_STD)
    x = run_sampler(name, steps, scheduler, lambda x, t: guide(cond(x, t), uncond(x, t), w), GUIDED_SHAPE)
    check(name, moment_errors(x, MU_U + w * (MU_C - MU_U), expected_std(scheduler, GUIDED_STD, steps, name)))


# Autoguidance (Karras et al. 2024): the run's model guided by a weaker model of the same condition,
#     weak + w (model - weak),
# is, with both optimal for Gaussians of one covariance, the optimal model of N(MU_W + w (MU_C - MU_W), S):
# the mean moves away from the weak model's. Run through a stage's ``predict``, so the test also checks
# that autoguidance asks the weak model for the *condition*: the null class's Gaussian (MU_U) lies
# elsewhere, and a predict that used it would sample another mean.
MU_W = torch.tensor([0.25, -0.1, 0.05, 0.0], dtype=torch.float64)  # the weak model's (at w = 3: 0.4, -0.4, ...)
MU_WU = torch.tensor([0.15, -0.05, 0.0, 0.05], dtype=torch.float64)  # the weak model's for the null condition


class GaussianUNet(torch.nn.Module):
    """A stand-in for a class-conditioned UNet2DModel: each class label's optimal model (``optimal_model``)
    for N(means[label], diag(GUIDED_STD^2)); a batch may mix labels."""

    def __init__(self, scheduler: DDPMScheduler, means: dict[int, torch.Tensor]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so that the stage finds a device
        self.models = {label: optimal_model(scheduler, mu, GUIDED_STD) for label, mu in means.items()}

    def forward(self, x, t, class_labels):
        out = torch.stack([self.models[int(label)](row[None], t)[0] for row, label in zip(x, class_labels)])
        return type("Output", (), {"sample": out})


@pytest.mark.parametrize("with_null", [False, True], ids=["same-condition", "weak-null"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("name,steps", [pytest.param(n, s, id=param_id(n, s)) for n, s in [("ddim", 50),
                                                                                          ("dpm++", 20)]])
def test_autoguidance_samples_away_from_the_weak_model(name, steps, w, with_null):
    """With ``sample.guide_with_null`` the weak model is asked for the null condition: away from MU_WU."""
    from ddpm.stage import ClassConditionedDDPM

    stage = ClassConditionedDDPM.from_dict({"sample": {"clip_denoised": False, "guide_with_null": with_null}})
    label, null = 3, stage.condition.null_label
    model = GaussianUNet(stage.scheduler, {label: MU_C, null: MU_U})
    stage.guide_model = GaussianUNet(stage.scheduler, {label: MU_W, null: MU_WU})
    weak = MU_WU if with_null else MU_W
    n = 512
    condition = stage.condition.class_condition(torch.full((n,), label))
    x = sample_loop(lambda x, t: stage.predict(model, x, t, condition, stage.condition.null_condition(condition), w),
                    make_sampler(name, stage.diffusion), standard_noise(n, GUIDED_SHAPE), steps)
    check(name, moment_errors(x, weak + w * (MU_C - weak), expected_std(stage.scheduler, GUIDED_STD, steps, name)))
