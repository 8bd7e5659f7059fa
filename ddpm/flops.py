"""What one training step of a stage costs in compute: its parameters and model FLOPs per image.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` over the forward and backward pass of
one batch (matmuls, convolutions and attention: the usual convention for MFU). Used by the
benchmarks and notebook 02.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch.utils.flop_counter import FlopCounterMode


def training_flops(stage, data: dict[str, torch.Tensor], device: torch.device | str, batch_size: int
                   ) -> tuple[int, float]:
    """(parameter count, model FLOPs per training image) of ``stage``'s freshly built model, on
    a batch of ``batch_size`` from ``data`` (the stage's ``load_data``)."""
    model = stage.build_model().to(device).train()
    raw = {k: v[:batch_size].to(device) for k, v in data.items()}
    batch = stage.make_batch(raw, torch.Generator(device).manual_seed(0))
    for attention in (m for m in model.modules() if isinstance(m, Attention)):
        attention.set_processor(AttnProcessor())  # plain matrix products, which the counter sees on every device
    with FlopCounterMode(display=False) as counter:
        stage.loss(model, batch).backward()
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / batch_size
