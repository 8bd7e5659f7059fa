"""A fine-tune's start: a finished text run (``init_from``), its config sections and its UNet.

The image stages start from it with a wider UNet (``widen_from``), DreamBooth with the UNet as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddpm.checkpoint import load_tensors, weights_file
from ddpm.config import read_yaml
from ddpm.diffusion_stage import Recipe
from ddpm.errors import UserError


def base_sections(init_from: str, what: str) -> dict:
    """The resolved config of the finished text run ``init_from`` that ``what`` (a fine-tune)
    starts from, less its stage and train sections."""
    if not init_from:
        raise UserError("init_from is not set; name a finished text run, e.g. init_from: runs/text_fashion_clip_quick")
    path = Path(init_from) / "config.yaml"
    if not path.is_file():
        raise UserError(f"init_from {init_from} is not a run directory (no config.yaml); train a text run first")
    base = read_yaml(path)
    if base.get("stage") != "text":
        raise UserError(f"init_from {init_from} is a '{base.get('stage')}' run; {what} starts from a text "
                        f"run (stage: text), e.g. runs/text_fashion_clip_quick")
    if not (Path(init_from) / "final" / "unet" / "config.json").is_file():
        raise UserError(f"init_from {init_from} has no final/ model yet; finish training it first")
    return {k: v for k, v in base.items() if k not in ("stage", "train")}


SCHEDULE = ("objective", "num_train_timesteps", "beta_schedule", "prediction_type")  # what a UNet's weights assume


def started_from(sections: dict, fixed: tuple[str, ...], inherited: tuple[str, ...], what: str) -> dict:
    """A fine-tune's config sections when it starts from the finished text run ``sections["init_from"]``:
    the ``fixed`` sections (what the run's weights were made with) are the run's, and a config that gives
    them otherwise is refused; each ``inherited`` section is the run's with this config's keys on top;
    the noise schedule is the run's (``SCHEDULE``: a config may repeat it, not change it, and what it leaves
    out is not the default but the run's). ``what`` names the fine-tune in errors."""
    init_from = sections["init_from"]
    base = base_sections(init_from, what)
    given = [k for k in fixed if k in sections and sections[k] != base.get(k)]
    if given:
        raise UserError(f"{given[0]} comes from init_from ({init_from}) and cannot change; remove the {given[0]} "
                        f"section")
    ours, theirs = sections.get("diffusion") or {}, base.get("diffusion") or {}
    changed = [k for k in SCHEDULE if k in ours and ours[k] != theirs.get(k, ours[k])]
    if changed:
        raise UserError(f"diffusion.{changed[0]} is {ours[changed[0]]!r} but init_from ({init_from}) was trained "
                        f"with {theirs[changed[0]]!r}; use that")
    merged = {**sections, **{k: base[k] for k in fixed if k in base}}
    for key in inherited:
        merged[key] = {**(base.get(key) or {}), **(sections.get(key) or {})}
    merged["diffusion"] = {**(merged.get("diffusion") or {}), **{k: theirs[k] for k in SCHEDULE if k in theirs}}
    return merged


class FromTextRun(Recipe):
    """Start from the finished text run ``init_from``: the config sections its weights were made with
    (``fixed``) are the run's, each ``inherited`` one the run's with this config's keys on top
    (``started_from``), and the network is its UNet, widened where this stage takes more input channels.
    Without ``init_from`` the stage trains from scratch, unless it ``needs`` one."""

    def __init__(self, fixed: tuple[str, ...] = ("model", "autoencoder", "text_encoder"),
                 inherited: tuple[str, ...] = (), needs: bool = False):
        self.fixed, self.inherited, self.needs = fixed, inherited, needs

    def sections(self, cls, sections: dict) -> dict:
        if self.needs or sections.get("init_from"):
            return started_from({"init_from": "", **sections}, self.fixed, self.inherited, f"a '{cls.name}' run")
        return sections

    def build_model(self, stage, then):
        if not stage.config.init_from:
            return then()
        if not stage.condition.extra_channels:
            return starting_model(stage)
        model = then()
        widen_from(model, starting_model(stage))
        return model


def starting_model(stage):
    """init_from's UNet, as it finished training."""
    return stage.model_class.from_pretrained(Path(stage.config.init_from) / "final" / "unet", use_safetensors=True)


def load_checkpoint(stage, folder: Path):
    """A checkpoint of a network a recipe changed (adapters, a learnt word): that network, with the
    checkpoint's EMA weights."""
    model = stage.build_model()
    model.load_state_dict(load_tensors(weights_file(folder / "ema")))
    return model


def widen_from(model: torch.nn.Module, base: torch.nn.Module) -> None:
    """Copy ``base``'s weights into ``model``, a UNet like it with more input channels (and perhaps
    a class embedding): the extra channels of ``conv_in`` and any weights ``base`` lacks start at
    zero, so ``model`` computes what ``base`` computed whatever the extra inputs are."""
    state = base.state_dict()
    new = model.state_dict()
    w = state["conv_in.weight"]  # out x C x 3 x 3 -> out x (C + K) x 3 x 3
    extra = new["conv_in.weight"].shape[1] - w.shape[1]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], dim=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"init_from's UNet has weights this one lacks ({unexpected[0]}, ...): the model "
                        f"sections differ")
    with torch.no_grad():
        for name in missing:
            model.get_parameter(name).zero_()
