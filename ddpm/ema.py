"""Exponential moving average (EMA) of a model's weights, kept as a second, frozen model.

Samples from the EMA model are smoother than from the raw weights, because the EMA
averages out the optimizer's step-to-step noise. With a constant decay of 0.9999, the
EMA would remember the random initial weights for ~10k steps, so the decay warms up:

    decay(step) = min(max_decay, 1 - (1 + step) ** -power)

(power 3/4 as in diffusers' ``EMAModel``: 0.5 after one step, 0.99 after ~460 steps,
0.999 after ~10k). The update is one fused ``_foreach_lerp_`` over all tensors instead of
a Python loop over parameters.

The power-function EMA (Karras et al. 2024, EDM2, section 3) has no fixed decay: at step t it is
(1 - 1/t)^(gamma + 1), so the average always spans the same fraction of the run so far, sigma_rel
(``train.ema_sigma_rel``; ``ddpm/posthoc_ema.py`` chooses it after training).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UserError


class EMA:
    def __init__(self, model: nn.Module, max_decay: float = 0.9999, warmup_power: float = 0.75):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.warmup_power = warmup_power
        self.step = 0
        self._pairs = None  # (ema tensors, live tensors), matched by name on the first update

    def decay(self) -> float:
        if self.warmup_power <= 0:
            return self.max_decay
        return min(self.max_decay, 1.0 - (1.0 + self.step) ** -self.warmup_power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * model, for every parameter and float buffer."""
        self.step += 1
        weight = 1.0 - self.decay()
        if self._pairs is None:
            live = dict(model.named_parameters()) | dict(model.named_buffers())
            ema = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
            names = [n for n, t in ema.items() if t.is_floating_point()]
            self._pairs = [ema[n] for n in names], [live[n].detach() for n in names]
        torch._foreach_lerp_(*self._pairs, weight)


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA of relative width ``sigma_rel``: the average at step t
    weighs step tau by p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1), whose std relative to t is
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2, eq. 3), solved for gamma by
    bisection (the width falls as gamma grows)."""
    if not 0 < sigma_rel < 12 ** -0.5:  # gamma -> -1 gives the widest profile, sqrt(1/12)
        raise UserError(f"sigma_rel must be in (0, {12 ** -0.5:.3f}), got {sigma_rel}")
    lo, hi = -1.0 + 1e-9, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        width = ((mid + 1) / ((mid + 2) ** 2 * (mid + 3))) ** 0.5
        lo, hi = (mid, hi) if width > sigma_rel else (lo, mid)
    return (lo + hi) / 2


class PowerEMA(EMA):
    """An EMA whose decay at step t is (1 - 1/t)^(gamma + 1) (EDM2, eq. 2): its average is ``p_t`` of
    ``gamma_of``, the same shape relative to the run's length as the run goes on."""

    def __init__(self, model: nn.Module, sigma_rel: float):
        super().__init__(model)
        self.sigma_rel, self.gamma = sigma_rel, gamma_of(sigma_rel)

    def decay(self) -> float:
        return (1 - 1 / self.step) ** (self.gamma + 1)  # step 1: decay 0, the EMA starts as the weights
