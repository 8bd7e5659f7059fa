"""The stage contract: what ``train.py`` and ``sample.py`` call on every stage.

A *stage* is one thing the trainer can train: a class-conditioned DDPM, an autoencoder, a
latent or text-conditioned diffusion model. The trainer and the sampler know nothing about
images or UNets; they call the methods below and read the stage's declared ``capabilities``
(never probe it with ``hasattr``). A new stage is one class that subclasses ``Stage`` (a
diffusion stage: ``ddpm.diffusion_stage.DiffusionStage``, which implements most of this),
one entry in ``ddpm.runs.STAGES`` and one config; see "How to add a stage" in the README.

Shapes: B is a batch, N a number of samples; images are uint8 N x 28 x 28 (0 = black).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .config import build
from .data import FASHION_MNIST, PixelFormat, class_index, pixel_format
from .errors import UserError


@dataclasses.dataclass(frozen=True)
class ConditionKind:
    """What a sample can be asked for: one ``sample.py`` flag (``--`` + ``name``, repeatable, a grid row
    per value) and one field of the web page, a list of ``choices(stage)`` or else free text.
    ``rows(stage, value)``: the rows one value asks for (``--class all``: every class), or a ``UserError``;
    the stage's ``generate_rows`` makes their images."""

    name: str
    help: str
    rows: Callable[["Stage", str], list[str]] = lambda stage, value: [value]
    choices: Callable[["Stage"], tuple[str, ...]] | None = None


def class_rows(stage: "Stage", value: str) -> list[str]:
    return list(stage.class_names) if value == "all" else [stage.class_names[class_index(value, stage.class_names)]]


CLASS = ConditionKind("class", 'class index or name ("9", "ankle boot"), or "all"; repeat for several', class_rows,
                      lambda stage: tuple(stage.class_names))
PROMPT = ConditionKind("prompt", 'one grid row per prompt ("" is unconditional); repeat for several')


@dataclasses.dataclass(frozen=True)
class SampleInput:
    """An image a stage's samples start from: one ``sample.py`` flag (``--`` + ``name`` with ``-`` for
    ``_``) and one upload on the web page. ``read(path)`` turns the PNG into what ``generate`` takes as
    ``inputs[name]``, or raises ``UserError`` saying what is wrong with it. ``with_init_image``: the input
    marks up the ``--init-image`` picture (an inpainting mask), which then goes to ``inputs["image"]``
    (uint8 1 x 28 x 28) instead of starting img2img."""

    name: str
    help: str
    read: Callable[[str], torch.Tensor]
    with_init_image: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a stage declares it can do; ``sample.py`` and the web page offer what these allow."""

    conditions: tuple[ConditionKind, ...] = ()  # what ``generate_rows`` accepts: CLASS, PROMPT, a stage's own
    inputs: tuple[SampleInput, ...] = ()  # the images every sample starts from (``generate``'s ``inputs``)
    generates: bool = False  # samples new images from noise (else: reconstructs its inputs)
    evaluates: bool = False  # has ``evaluate`` (the judge's numbers, or the autoencoder's PSNR)
    composes: bool = False  # has ``generate_composed`` (several prompts, weighted, in one guided step)
    adapters: bool = False  # has ``add_adapters`` (LoRA weights into the model)
    scores: bool = False  # has ``scorer`` (image-text agreement: the CLIP score, ranking)
    measures: tuple[str, ...] = ()  # further measurements ``measure`` makes beside ``evaluate``

    @property
    def marks_up_init_image(self) -> bool:
        """Whether an input marks up the ``--init-image`` picture, which is then no img2img start."""
        return any(i.with_init_image for i in self.inputs)

    def asks(self, name: str) -> bool:
        """Whether a sample can be asked for the condition kind ``name``."""
        return any(kind.name == name for kind in self.conditions)

    def __post_init__(self):
        unknown = [c for c in self.conditions if not isinstance(c, ConditionKind)]
        assert not unknown, f"unknown conditions {unknown}: declare each as a ConditionKind"


class Stage:
    """The base of every stage. Subclasses set ``name``, ``Config`` and ``capabilities``."""

    name: ClassVar[str]  # the config's ``stage:`` value
    Config: ClassVar[type]  # a dataclass whose fields are the config's sections (besides ``train``)
    capabilities: ClassVar[Capabilities] = Capabilities()
    class_names: tuple[str, ...] = ()  # the classes ``--class`` and the judge know (set by the stage)
    data_sources: ClassVar[tuple[str, ...]] = ("fashion_mnist",)  # the ``data.source`` values it trains on

    def __init__(self, config):
        self.config = config
        source = getattr(getattr(config, "data", None), "source", "fashion_mnist")
        if source not in self.data_sources:
            raise UserError(f"a '{self.name}' run trains on {' or '.join(self.data_sources)} only so far, not "
                            f"data.source={source}")

    def pixels(self) -> PixelFormat:
        """The images it trains on and makes (``ddpm/data.py``): its ``data`` section's, else Fashion-MNIST's."""
        data = getattr(self.config, "data", None)
        return FASHION_MNIST if data is None else pixel_format(data)

    @classmethod
    def from_dict(cls, sections: dict) -> "Stage":
        """The stage from a config's sections (``train`` and ``stage`` removed), checked key by key."""
        return cls(build(cls.Config, sections, where="config"))

    # -- training (train.py) ----------------------------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        """The whole training set held in memory: equal-length tensors (N x ...), indexed per batch."""
        raise NotImplementedError

    def make_batch(self, raw: dict[str, torch.Tensor], generator: torch.Generator, step: int = 0
                   ) -> dict[str, torch.Tensor]:
        """``raw``: ``load_data``'s tensors at one global batch's indices (B x ...). Returns the
        training batch (B x ... tensors), every random draw taken from ``generator`` (seeded by
        the trainer from (seed, step)), so that any process can make any step's batch."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The network to train, freshly initialised."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        """A scalar: the mean loss of a (micro-)batch, a slice of ``make_batch``'s output; or a dict
        of scalars, ``"loss"`` (what is minimised) and named parts of it that the trainer logs too."""
        raise NotImplementedError

    # -- looking at it (train.py and sample.py) ----------------------------------------

    def preview(self, model: nn.Module, path: Path, title: str = "") -> Path:
        """Write a fixed-seed PNG grid of what the model makes; returns ``path``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, n: int, **settings) -> dict[str, float]:
        """Numbers for metrics.jsonl (when ``capabilities.evaluates``), measured on ``n`` samples or test
        images; a generating stage takes sampling ``settings`` (guidance, scheduler, steps, seed)."""
        raise NotImplementedError

    def report_table(self, report: dict) -> str:
        """``evaluate``'s numbers as the table ``sample.py --evaluate`` prints."""
        return ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" if isinstance(v, float) else
                         f"{k.removeprefix('eval_')} {v}" for k, v in report.items())

    def measure(self, name: str, model: nn.Module, scales: list[float | None], out_dir: Path, **settings) -> str:
        """One of ``capabilities.measures`` at each guidance scale (None: the run's); writes its files
        into ``out_dir`` and returns what to print."""
        raise NotImplementedError

    # -- generating (sample.py; when ``capabilities.generates``) -------------------------

    def generate(self, model: nn.Module, labels: torch.Tensor, **settings) -> torch.Tensor:
        """One image per class label (int64 N) -> uint8 N x 28 x 28."""
        raise NotImplementedError

    def generate_rows(self, model: nn.Module, kind: str, rows: list[str], **settings) -> torch.Tensor:
        """One image per row, a value of the condition kind named ``kind`` (``ConditionKind.rows``) -> uint8
        N x 28 x 28; what ``sample.py`` and the page call for every kind."""
        raise NotImplementedError

    def generate_prompts(self, model: nn.Module, prompts: list[str], **settings) -> torch.Tensor:
        """One image per prompt (when ``capabilities.asks("prompt")``) -> uint8 N x 28 x 28."""
        raise NotImplementedError

    def generate_composed(self, model: nn.Module, prompts: list[str], weights: list[float], n: int,
                          **settings) -> torch.Tensor:
        """n images, each from all ``prompts`` composed with their ``weights`` (``capabilities.composes``)."""
        raise NotImplementedError

    def sampling_settings(self, **given) -> dict:
        """A sampling call's settings: those ``given`` (None: unset), else the ``sample`` config's, checked."""
        raise NotImplementedError

    # -- what other runs add (sample.py --lora, --clip) ----------------------------------

    def add_adapters(self, model: nn.Module, folder: Path) -> nn.Module:
        """Adapter weights saved in ``folder`` added to ``model`` (``capabilities.adapters``)."""
        raise NotImplementedError

    def scorer(self, model: nn.Module):
        """An object with ``score(images, prompts)`` and ``score_labels(images, labels, phrasings)``, float N:
        how well each uint8 28 x 28 image fits its prompt (``capabilities.scores``)."""
        raise NotImplementedError

    # -- saving and loading -----------------------------------------------------------

    def save_final(self, model: nn.Module, folder: Path) -> None:
        """The trained (EMA) model as diffusers/transformers ``save_pretrained`` folders in ``folder``."""
        raise NotImplementedError

    def load_model(self, folder: Path) -> nn.Module:
        """The model from a ``final/`` folder or a checkpoint folder (its EMA weights)."""
        raise NotImplementedError
