"""Train a config as train.py does, and record what this process trained on.

    accelerate launch ... tests/process_probe.py CONFIG OUT_DIR [section.key=value ...]

Writes OUT_DIR/rank-R.json: for every call of the stage's loss (one per step without gradient
accumulation), a digest of each example of the micro-batch (its clean input alone, and all
its tensors together: input, noise, timestep, dropped condition...) and a digest of the
weights the process held before that step. ``assert_two_processes_train_like_one``
(tests/conftest.py) compares two processes with one, which runs ``main`` in the test's own
interpreter.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

import train
from ddpm.config import apply_overrides, read_yaml

CLEAN_INPUT = ("x0", "x", "pixel_values")  # the example before any noise: the (scaled) image or latent


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def record_losses(stage, calls: list) -> None:
    loss = stage.loss

    def recording_loss(model, batch):
        clean = next(batch[k] for k in CLEAN_INPUT if k in batch)
        calls.append({"inputs": [digest(row) for row in clean],
                      "examples": [digest(*(v[i] for v in batch.values())) for i in range(len(clean))],
                      "weights": digest(*(p for p in model.parameters()))})
        return loss(model, batch)

    stage.loss = recording_loss


def main(config: str, out_dir: str, *overrides: str) -> None:
    calls: list = []
    load_config = train.load_config

    def load_and_record(raw):
        stage, cfg, resolved = load_config(raw)
        record_losses(stage, calls)
        return stage, cfg, resolved

    train.load_config = load_and_record
    try:
        train.train(apply_overrides(read_yaml(config), list(overrides)))
    finally:
        train.load_config = load_config  # as it was, when a test calls main in its own process
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{PartialState().process_index}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main(*sys.argv[1:])
