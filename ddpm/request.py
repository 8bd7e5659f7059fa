"""A sampling request, checked in one place: its numbers, and the images it starts from, read once.
``sample.py``, the web page and ``DiffusionStage.sample`` all call these."""

from __future__ import annotations

import torch

from .contract import SampleInput
from .data import IMAGE_SIZE, read_image
from .diffusion import SAMPLERS
from .errors import UserError

# name shown, lowest, highest (None: no limit), whole numbers only
RANGES = {"steps": ("steps", 1, None, True), "n": ("images", 1, None, True), "seed": ("seed", 0, 2**63 - 1, True),
          "guidance": ("guidance", 0, None, False), "strength": ("strength", 0, 1, False)}


def check_request(limits: dict | None = None, **asked) -> None:
    """One line for the first of the ``asked`` settings (``scheduler`` and those of ``RANGES``) that is out of
    range; ``limits`` lowers a range's highest value (the page's: ``{"n": 64}``)."""
    for key, value in asked.items():
        if key == "scheduler":
            if value not in SAMPLERS:
                raise UserError(f"unknown scheduler {value!r}; valid: {', '.join(SAMPLERS)}")
            continue
        name, lo, hi, whole = RANGES[key]
        hi = (limits or {}).get(key, hi)
        if value is None or (whole and value != int(value)) or value < lo or (hi is not None and value > hi):
            top = "" if hi is None else f" to {hi}" if whole else f" to {hi:g}"
            raise UserError(f"{name} must be {'a whole number ' if whole else ''}from {lo}{top}, got {value}")


def read_inputs(init_image: str | None, given: dict[str, str | None], inputs: tuple[SampleInput, ...]
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The images a request starts from: each of the declared ``inputs`` that is ``given`` (a path), read by
    its ``SampleInput``; and ``init_image``, img2img's start (uint8 1 x 28 x 28), or, where an input marks
    it up (a mask), ``inputs["image"]`` instead (then None)."""
    read = {}
    for item in inputs:
        if not given.get(item.name):
            continue
        if item.with_init_image:
            if not init_image:
                raise UserError(f"{item.flag} needs --init-image, the picture it marks up")
            read["image"] = read_image(init_image, sizes=(IMAGE_SIZE,))
        read[item.name] = item.read(given[item.name])
    return read, read_image(init_image) if init_image and "image" not in read else None
