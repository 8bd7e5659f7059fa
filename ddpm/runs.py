"""From a config or a run directory to a stage and its model: what ``train.py``,
``sample.py``, the benchmarks and the notebooks all start from.

    stage, train_config, resolved = load_config(read_yaml("configs/ddpm_fashion_quick.yaml"))
    stage, model, folder = load_for_sampling("runs/ddpm_fashion_quick")

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/step-N/`` and, once
finished, ``final/``. ``STAGES`` names each stage's class by module path: a stage module is
imported only when a config asks for it, so ``ddpm`` never imports ``latent`` or
``conditioning`` (they import ``ddpm``).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

from .checkpoint import MANIFEST, latest_good_checkpoint, verify_checkpoint
from .config import TrainConfig, apply_overrides, build, read_yaml, to_dict
from .contract import SampleInput, Stage
from .errors import UserError
from .plots import read_metrics

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


def sample_inputs() -> dict[str, tuple[SampleInput, list[str]]]:
    """Every input image a registered stage declares (``capabilities.inputs``) by name, with the stages
    that take it: what ``sample.py`` makes its flags from."""
    found: dict[str, tuple[SampleInput, list[str]]] = {}
    for name in STAGES:
        for item in stage_class(name).capabilities.inputs:
            found.setdefault(item.name, (item, []))[1].append(name)
    return found


def load_config(raw: dict) -> tuple[Stage, TrainConfig, dict]:
    """A raw config dict -> (stage object, TrainConfig, the resolved config as a dict)."""
    raw = dict(raw)
    name = raw.pop("stage", None)
    if name is None:
        raise UserError(f"the config has no 'stage' key; valid stages: {', '.join(STAGES)}")
    cls = stage_class(name)
    train_config = build(TrainConfig, raw.pop("train", None), where="train")
    sections = set(cls.Config.__dataclass_fields__)
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}; valid: stage, train, {', '.join(sorted(sections))}")
    stage = cls.from_dict(raw)
    resolved = {"stage": name, "train": to_dict(train_config), **to_dict(stage.config)}
    return stage, train_config, resolved


FIXED_BY_TRAINING = ("stage", "train", "model")  # sections sampling-time overrides may not change


def load_run(run_dir: str | Path, overrides: list[str] = ()) -> tuple[Stage, TrainConfig, dict]:
    """The stage and TrainConfig a run was trained with, from its saved config.yaml; ``overrides``
    (``section.key=value``, as train.py takes them) change how it samples, e.g. ``sample.guidance=5``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); train one with train.py")
    for item in overrides:
        if item.split(".")[0].split("=")[0] in FIXED_BY_TRAINING:
            raise UserError(f"{item}: the {', '.join(FIXED_BY_TRAINING)} sections are what the run was trained "
                            f"with; sampling overrides change the others, e.g. sample.guidance=5")
    return load_config(apply_overrides(read_yaml(path), list(overrides)))


def model_folder(path: str | Path) -> Path:
    """A run directory -> its ``final/`` (else its newest good checkpoint); a checkpoint folder
    -> itself, verified."""
    path = Path(path)
    if (path / MANIFEST).is_file():  # runs/NAME/checkpoints/step-N
        verify_checkpoint(path)
        return path
    if (path / "final").is_dir():
        return path / "final"
    folder = latest_good_checkpoint(path / "checkpoints", warn=lambda m: print(m, file=sys.stderr))
    if folder is None:
        raise UserError(f"{path} has neither final/ nor a good checkpoint; train it first")
    return folder


def run_dir_of(folder: Path) -> Path:
    """The run directory of a ``final/`` or ``checkpoints/step-N`` folder."""
    return folder.parent if folder.name == "final" else folder.parent.parent


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()):
    """A run directory or checkpoint folder -> (stage, its model in eval mode on ``device``,
    the folder the weights came from); the EMA weights, as ``final/`` holds them. ``overrides``:
    see ``load_run``."""
    path = Path(path)
    run_dir = path.parent.parent if (path / MANIFEST).is_file() else path
    stage, _, _ = load_run(run_dir, overrides)
    folder = model_folder(path)
    return stage, stage.load_model(folder).to(device).eval(), folder


def load_scorer(path: str | Path, device: str | torch.device = "cpu"):
    """A run that scores images against text (``capabilities.scores``: our CLIP) -> its ``scorer``."""
    stage, model, _ = load_for_sampling(path, device)
    if not stage.capabilities.scores:
        raise UserError(f"{path} is a '{stage.name}' run, which scores no images against text; give a CLIP run "
                        f"(python train.py configs/clip_fashion_quick.yaml)")
    return stage.scorer(model)


def model_step(folder: Path) -> int:
    """The optimizer step the weights in a ``final/`` or checkpoint folder come from."""
    if folder.name != "final":
        return json.loads((folder / "trainer_state.json").read_text())["step"]
    return max((r["step"] for r in read_metrics(folder.parent / "metrics.jsonl")), default=0)


def is_local_path(source: str) -> bool:
    """Does ``source`` name a folder on this machine rather than a Hub repository ("owner/name")?
    Yes when it starts with . / ~, or its first part is ``runs`` (where train.py writes) or a folder here."""
    first = Path(source).parts[0] if source else ""
    return source.startswith((".", "/", "~")) or first == "runs" or (first != source and Path(first).is_dir())


def missing_folder(source: str, what: str) -> UserError:
    """The one line for a run or folder that is not there (and is not looked up on the Hub): train it
    first, with its preset when one is named like it (``runs/NAME`` <- ``configs/NAME.yaml``)."""
    preset = Path("configs") / f"{Path(source).name}.yaml"
    how = (f"train it first: python train.py {preset}" if (Path(__file__).parents[1] / preset).is_file()
           else "train it first, or check the path")
    return UserError(f"{what} {source} does not exist (a path here, so not looked up on the Hub); {how}")
