"""A run folder and what it holds, for a stage class already known: the stage and model a run was trained
with, the folder its weights are in, its step. The stage registry (``runs.py``) finds the class by the
config's ``stage:`` and calls these; a stage that opens a run of a known stage (a fine-tune's starting
run) calls them directly, so no stage module imports the registry back.

A run directory holds ``config.yaml`` (the resolved config), ``checkpoints/step-N/`` and, once
finished, ``final/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .checkpoint import MANIFEST, latest_good_checkpoint, verify_checkpoint
from .config import TrainConfig, apply_overrides, build, read_yaml, to_dict
from .errors import UserError
from .plots import read_metrics


def configured(cls, raw: dict) -> tuple:
    """A raw config dict (its ``stage`` removed) -> (a ``cls`` stage, TrainConfig, the resolved config)."""
    raw = dict(raw)
    train_config = build(TrainConfig, raw.pop("train", None), where="train")
    sections = set(cls.Config.__dataclass_fields__)
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}; valid: stage, train, {', '.join(sorted(sections))}")
    stage = cls.from_dict(raw)
    resolved = {"stage": cls.name, "train": to_dict(train_config), **to_dict(stage.config)}
    return stage, train_config, resolved


FIXED_BY_TRAINING = ("stage", "train", "model")  # sections sampling-time overrides may not change


def run_config(run_dir: str | Path, overrides: list[str] = ()) -> dict:
    """The config a run was trained with (its config.yaml), with sampling ``overrides`` (``section.key=value``,
    as train.py takes them, e.g. ``sample.guidance=5``) applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); train one with train.py")
    for item in overrides:
        if item.split(".")[0].split("=")[0] in FIXED_BY_TRAINING:
            raise UserError(f"{item}: the {', '.join(FIXED_BY_TRAINING)} sections are what the run was trained "
                            f"with; sampling overrides change the others, e.g. sample.guidance=5")
    return apply_overrides(read_yaml(path), list(overrides))


def run_path(path: str | Path) -> Path:
    """The run directory of a run directory or of one checkpoint folder in it."""
    path = Path(path)
    return path.parent.parent if (path / MANIFEST).is_file() else path


def load_trained(cls, path: str | Path, device: str | torch.device = "cpu", stage=None):
    """A run of the stage ``cls`` (its directory or a checkpoint folder) -> (stage, model in eval mode
    on ``device``, the folder the weights came from): the EMA weights, as ``final/`` holds them. ``stage``:
    the run's stage already configured (with sampling overrides)."""
    if stage is None:
        raw = run_config(run_path(path))
        if raw.get("stage") != cls.name:
            raise UserError(f"{path} is a '{raw.get('stage')}' run; a '{cls.name}' run is needed here")
        stage = configured(cls, {k: v for k, v in raw.items() if k != "stage"})[0]
    folder = model_folder(path)
    return stage, stage.load_model(folder).to(device).eval(), folder


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
