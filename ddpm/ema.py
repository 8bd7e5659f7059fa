"""Exponential moving average (EMA) of a model's weights, kept as a second, frozen model.

Samples from the EMA model are smoother than from the raw weights, because the EMA
averages out the optimizer's step-to-step noise. With a constant decay of 0.9999, the
EMA would remember the random initial weights for ~10k steps, so the decay warms up:

    decay(step) = min(max_decay, 1 - (1 + step) ** -power)

(power 3/4 as in diffusers' ``EMAModel``: 0.5 after one step, 0.99 after ~460 steps,
0.999 after ~10k). The update is one fused ``_foreach_lerp_`` over all tensors instead of
a Python loop over parameters.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


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
