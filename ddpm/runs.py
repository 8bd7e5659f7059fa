"""From a config or a run directory to a stage and its model: what ``train.py``,
``sample.py``, the benchmarks and the notebooks all start from.

    stage, train_config, resolved = load_config(read_yaml("configs/ddpm_fashion_quick.yaml"))
    stage, model, folder = load_for_sampling("runs/ddpm_fashion_quick")

``STAGES`` names each stage's class by module path: a stage module is imported only when a config
asks for it, so ``ddpm`` never imports ``latent`` or ``conditioning`` (they import ``ddpm``), and no
stage module imports this one (a run of a known stage opens with ``run_folder.load_trained``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from .config import TrainConfig
from .contract import ConditionKind, SampleInput, Stage
from .errors import UserError
from .run_folder import configured, load_trained, run_config, run_path

STAGES = {
    "ddpm": "ddpm.stage:ClassConditionedDDPM",
    "autoencoder": "latent.autoencoder:AutoencoderStage",
    "latent": "latent.stage:LatentDDPM",
    "text": "conditioning.text.stage:TextConditionedLDM",
    "clip": "conditioning.clip.stage:ClipStage",
    "dreambooth": "conditioning.finetune.dreambooth:DreamBoothLDM",
    "upscale": "conditioning.image.upscale:SuperResolutionLDM",
    "inpaint": "conditioning.image.inpaint:InpaintingLDM",
    "structure": "conditioning.image.structure:StructureLDM",
}


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_declarations(what: str) -> dict[str, tuple[SampleInput | ConditionKind, list[str]]]:
    """Every input image (``what`` = "inputs") or kind of condition ("conditions") a registered stage
    declares in its ``capabilities``, by name, with the stages that declare it: what ``sample.py`` makes
    its flags from."""
    found: dict[str, tuple[SampleInput | ConditionKind, list[str]]] = {}
    for name in STAGES:
        for item in getattr(stage_class(name).capabilities, what):
            found.setdefault(item.name, (item, []))[1].append(name)
    return found


def load_config(raw: dict) -> tuple[Stage, TrainConfig, dict]:
    """A raw config dict -> (stage object, TrainConfig, the resolved config as a dict)."""
    raw = dict(raw)
    name = raw.pop("stage", None)
    if name is None:
        raise UserError(f"the config has no 'stage' key; valid stages: {', '.join(STAGES)}")
    return configured(stage_class(name), raw)


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> tuple[Stage, TrainConfig, dict]:
    """The stage and TrainConfig a run was trained with, from its saved config.yaml; ``overrides``
    (``section.key=value``, as train.py takes them) change how it samples, e.g. ``sample.guidance=5``."""
    return load_config(run_config(run_dir, overrides))


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()):
    """A run directory or checkpoint folder -> (stage, its model in eval mode on ``device``,
    the folder the weights came from); the EMA weights, as ``final/`` holds them. ``overrides``:
    see ``load_run``."""
    stage, _, _ = load_run(run_path(path), overrides)
    return load_trained(type(stage), path, device, stage)


def load_scorer(path: str | Path, device: str | torch.device = "cpu"):
    """A run that scores images against text (``capabilities.scores``: our CLIP) -> its ``scorer``."""
    stage, model, _ = load_for_sampling(path, device)
    if not stage.capabilities.scores:
        raise UserError(f"{path} is a '{stage.name}' run, which scores no images against text; give a CLIP run "
                        f"(python train.py configs/clip_fashion_quick.yaml)")
    return stage.scorer(model)
