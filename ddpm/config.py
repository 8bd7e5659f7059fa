"""Run configs: a YAML file from configs/, plus ``section.key=value`` overrides.

A config names its ``stage`` and has a ``train`` section (read by the trainer, the same for
every stage) and the stage's own sections (``data``, ``model``, ...). Each section is a
dataclass, so a mistyped key or a value of the wrong type is a one-line error that lists
what is valid, before anything is trained.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError


@dataclasses.dataclass
class TrainConfig:
    """What the shared trainer needs; no field here knows about images or UNets."""

    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 64  # global: images per optimizer step, over all processes and micro-batches
    grad_accum_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None  # if set, overrides epochs
    lr: float = 1e-3
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.0  # AdamW's, on weight matrices only (not biases, norms, scalars)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 where the GPU has it
    allow_tf32: bool = True
    compile: bool = False  # torch.compile the model (helps on GPUs, not on CPUs)
    ema_decay: float = 0.9999  # the most the EMA decay reaches
    ema_warmup_power: float = 0.75  # decay = 1 - (1 + step)^-power until it reaches ema_decay
    ema_sigma_rel: float | None = None  # instead: a power-function EMA this wide relative to the run (ddpm/ema.py)
    # post-hoc EMA (ddpm/posthoc_ema.py): the widths of the power-function EMAs kept, e.g. [0.05, 0.1], and
    # every how many steps they are written to RUN/posthoc/
    posthoc_ema: list[float] = dataclasses.field(default_factory=list)
    posthoc_every: int = 0
    log_every: int = 50
    sample_every: int = 0  # 0: a preview grid only at the end
    eval_every: int = 0  # 0: no quality evaluation during training
    eval_n: int = 500  # samples per evaluation
    checkpoint_every: int = 1000  # 0: only the final checkpoint
    keep_last: int = 3
    keep_steps: list[int] = dataclasses.field(default_factory=list)  # also checkpoint these steps, and keep them
    trackers: list[str] = dataclasses.field(default_factory=list)  # "wandb", "tensorboard"
    resume: str | None = None  # "latest" or a checkpoint folder

    def __post_init__(self):
        positive = ["batch_size", "grad_accum_steps", "log_every", "keep_last", "eval_n"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ["lr", "epochs"]:
            if not getattr(self, name) > 0:
                raise UserError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ["warmup_steps", "weight_decay", "sample_every", "eval_every", "checkpoint_every",
                     "posthoc_every"]:
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"train.max_steps must be > 0, got {self.max_steps}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if bool(self.posthoc_ema) != bool(self.posthoc_every):
            raise UserError("train.posthoc_ema (the EMA widths, e.g. [0.05, 0.1]) and train.posthoc_every (steps "
                            "between snapshots) are set together")
        widths = [*self.posthoc_ema, *([self.ema_sigma_rel] if self.ema_sigma_rel is not None else [])]
        if not all(0 < s < 12 ** -0.5 for s in widths):
            raise UserError(f"train.posthoc_ema and train.ema_sigma_rel widths must be in (0, 0.288), got "
                            f"{self.posthoc_ema} and {self.ema_sigma_rel}")
        if any(s <= 0 for s in self.keep_steps):
            raise UserError(f"train.keep_steps must be steps >= 1, got {self.keep_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise UserError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        unknown = set(self.trackers) - {"wandb", "tensorboard"}
        if unknown:
            raise UserError(f"unknown train.trackers {sorted(unknown)}; valid: wandb, tensorboard")
        if "tensorboard" in self.trackers and importlib.util.find_spec("tensorboard") is None:
            raise UserError("train.trackers=[tensorboard] needs TensorBoard: pip install -e '.[trackers]'")

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps in a run: ``max_steps``, else ``epochs`` of full batches of ``n_examples``."""
        return self.max_steps or max(1, math.ceil(self.epochs * (n_examples // self.batch_size)))


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-3`` is a float, as in YAML 1.2 (PyYAML follows
    YAML 1.1, where a float needs a dot, ``1.0e-3``, and ``1e-3`` is the string "1e-3")."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+.0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; presets are in configs/")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML: 1e-3, [32, 64], null)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = parse_yaml(text) if text else None
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return raw


def build(cls, values: dict | None, where: str):
    """Make dataclass ``cls`` from a dict, checking key names and value types."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown key {where}.{unknown[0]}; valid keys in {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _check(values[name], hints[name], f"{where}.{name}") for name in values}
    return cls(**kwargs)


def _check(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` converted to ``hint`` (int -> float, list -> tuple) or raise UserError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a section (a mapping), got {value!r}")
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value not in args:
            raise UserError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where} must have {len(args)} items, got {value!r}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise UserError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def check_model_keys(model: dict, cls: type, derived: tuple[str, ...]) -> None:
    """A ``model`` section holds keyword arguments of ``cls`` (a network class), except those
    the stage derives from the data (``derived``)."""
    valid = set(inspect.signature(cls.__init__).parameters) - {"self", *derived}
    for key in model:
        if key in derived:
            raise UserError(f"model.{key} is set from the data; remove it from the config")
        if key not in valid:
            raise UserError(f"unknown key model.{key}; valid {cls.__name__} keys: {', '.join(sorted(valid))}")


def to_dict(config) -> dict:
    """A dataclass config as plain YAML-safe data (tuples become lists)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))
