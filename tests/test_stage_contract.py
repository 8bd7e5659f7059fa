"""The stage contract: every stage declares what it can do, trains as it did before the
contract was written down, and the scripts reach stages only through the library.

``data/reference_losses.json`` holds the per-step losses of a tiny run of every stage,
recorded with one torch thread before the stages were moved onto ``ddpm/contract.py`` and
``ddpm/diffusion_stage.py`` (the CLIP stage's when it was added; ``python -m
tests.test_stage_contract`` records them again).
With one thread on the same machine they are equal to the last bit; another CPU rounds
differently (seen: CI's machine differed in the 7th significant digit), so they are compared to
a relative 1e-5, far below what any change to the data, the model or the loss would move them.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import sys

import pytest
import torch

import numpy as np
import yaml
from PIL import Image

import train
from ddpm.config import read_yaml
from ddpm.contract import CLASS, Capabilities, ConditionKind, SampleInput, Stage, class_rows
from ddpm.data import read_image
from ddpm.errors import UserError
from ddpm.stage import ClassConditionedDDPM
from ddpm.web import Explorer, Request
from ddpm.diffusion_stage import DiffusionStage
from ddpm.runs import STAGES, stage_class

from .conftest import (ROOT, TINY, TINY_AUTOENCODER, TINY_LATENT, losses, one_line_error, run, same_as_command,
                       tiny_config)

REFERENCE = ROOT / "tests" / "data" / "reference_losses.json"
TINY_TEXT = ROOT / "configs" / "text_fashion_tiny.yaml"  # the offline MiniLM encoder, as shipped
TINY_CLIP = ROOT / "configs" / "clip_fashion_tiny.yaml"


def train_tiny_runs(root) -> dict[str, list[float]]:
    """A tiny run of every stage (the latent and text runs on the tiny autoencoder), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        autoencoder = train.train(tiny_config(root / "autoencoder", TINY_AUTOENCODER))
        on_it = {"autoencoder": {"source": str(autoencoder)}}
        return {"ddpm": losses(train.train(tiny_config(root / "ddpm", TINY))),
                "autoencoder": losses(autoencoder),
                "latent": losses(train.train(tiny_config(root / "latent", TINY_LATENT, **on_it))),
                "text": losses(train.train(tiny_config(root / "text", TINY_TEXT, **on_it))),
                "clip": losses(train.train(tiny_config(root / "clip", TINY_CLIP)))}
    finally:
        torch.set_num_threads(threads)


def test_every_stage_trains_exactly_as_before(tmp_path, fashion_mnist):
    reference = json.loads(REFERENCE.read_text())
    trained = train_tiny_runs(tmp_path)
    assert trained.keys() == reference.keys()
    for stage, expected in reference.items():
        assert trained[stage] == pytest.approx(expected, rel=1e-5), stage


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_declares_its_capabilities(name):
    cls = stage_class(name)
    assert issubclass(cls, Stage) and cls.name == name
    can = cls.capabilities
    assert isinstance(can, Capabilities) and all(isinstance(kind, ConditionKind) for kind in can.conditions)
    # what sample.py relies on: a stage that generates is a diffusion stage asked for classes
    assert can.generates == issubclass(cls, DiffusionStage)
    assert can.generates == can.asks("class")
    for method in ("load_data", "make_batch", "build_model", "loss", "preview", "save_final", "load_model"):
        assert getattr(cls, method) is not getattr(Stage, method), f"{name} does not implement {method}"
    if can.evaluates:
        assert cls.evaluate is not Stage.evaluate
    if can.asks("prompt"):
        assert cls.generate_prompts is not Stage.generate_prompts
    if can.generates:
        assert cls.generate_rows is not Stage.generate_rows


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_is_composed_not_stacked(name):
    """Above a registered stage's class are at most the project's ``Stage`` and ``DiffusionStage``: what it
    diffuses on and what it is conditioned on are objects it holds (``space``, ``condition``), not bases."""
    above = [c for c in stage_class(name).__mro__[1:] if c.__module__.split(".")[0] in PACKAGES]
    assert above in ([Stage], [DiffusionStage, Stage]), f"{name}: {[c.__qualname__ for c in above]}"


def test_unknown_capability_is_refused():
    with pytest.raises(AssertionError, match="unknown conditions"):
        Capabilities(conditions=("smell",))


def imports_of(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_scripts_import_the_library_not_each_other():
    scripts = [ROOT / "train.py", ROOT / "sample.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    for script in scripts:
        assert not imports_of(script) & {"train", "sample", "benchmarks"}, f"{script.name} imports a script"


def test_no_capability_probes_in_the_scripts():
    for script in (ROOT / "train.py", ROOT / "sample.py"):
        calls = [node.func.id for node in ast.walk(ast.parse(script.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
        assert "hasattr" not in calls and "getattr" not in calls, script.name


def test_sample_py_and_the_web_page_know_no_stage():
    """sample.py and the page work from the contract alone: they import no later stage's package, and no
    string in them (their docstrings' example commands apart) names a stage: no "'inpaint'", no "a text run"."""
    for path in (ROOT / "sample.py", ROOT / "ddpm" / "web.py"):
        assert not imports_of(path) & {"latent", "conditioning"}, path.name
        tree = ast.parse(path.read_text())
        texts = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and node.value != ast.get_docstring(tree, clean=False)]
        for name in STAGES:
            named = [t for t in texts if t == name or f"'{name}'" in t or re.search(rf"\ban? {name} run\b", t)]
            assert not named, f"{path.name} names the stage {name!r}: {named}"


def read_stencil(path: str) -> torch.Tensor:
    return read_image(path, "--stencil", sizes=(28,)) >= 128


MIRROR = ConditionKind("mirror", "a class, its garments drawn mirrored", class_rows, lambda stage: stage.class_names)


class StencilledDDPM(ClassConditionedDDPM):
    """An example stage with an input and a kind of condition no other stage has: stage 1's samples cut
    out by a stencil, and asked for a class or a mirrored class. Declaring them is all it takes for
    sample.py (``--stencil``, ``--mirror``) and the web page (an upload, a field)."""

    name = "stencil"
    capabilities = dataclasses.replace(ClassConditionedDDPM.capabilities, conditions=(CLASS, MIRROR), inputs=(
        SampleInput("stencil", "28 x 28, white where the garment may be", read_stencil),))

    def generate(self, model, labels, *, inputs=None, **settings):
        if not inputs or "stencil" not in inputs:
            raise UserError("a 'stencil' run samples through a stencil: give --stencil")
        return super().generate(model, labels, **settings) * inputs["stencil"]

    def generate_rows(self, model, kind, rows, **settings):
        if kind == "mirror":
            return super().generate_rows(model, "class", rows, **settings).flip(-1)
        return super().generate_rows(model, kind, rows, **settings)


def test_a_new_stage_is_served_by_sample_py_and_the_page_unchanged(trained_tiny_run, tmp_path, monkeypatch):
    """Register the example stage, give a trained stage-1 run its name: sample.py takes ``--stencil`` and
    ``--mirror``, the page an upload and a field for them, and both make the same images, zero outside the
    stencil; a mirrored class is the class's images, mirrored."""
    monkeypatch.setitem(STAGES, "stencil", f"{__name__}:StencilledDDPM")
    run_dir = tmp_path / "stencil"
    shutil.copytree(trained_tiny_run, run_dir)
    config = read_yaml(run_dir / "config.yaml")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "stage": "stencil"}))
    stencil = np.zeros((28, 28), np.uint8)
    stencil[4:24, 8:20] = 255
    Image.fromarray(stencil).save(tmp_path / "stencil.png")

    arrays = {}
    for kind in ("class", "mirror"):
        result = run("sample.py", str(run_dir), f"--{kind}", "Bag", "--n", "3", "--steps", "2", "--stencil",
                     str(tmp_path / "stencil.png"), "--save-array", str(tmp_path / f"{kind}.npy"),
                     "--out", str(tmp_path / f"{kind}.png"))
        assert result.returncode == 0, result.stderr
        arrays[kind] = np.load(tmp_path / f"{kind}.npy")
    images = arrays["class"]
    assert images[:, stencil == 0].max() == 0 and images[:, stencil > 0].max() > 0
    assert np.array_equal(arrays["mirror"], images[..., ::-1])
    one_line_error(run("sample.py", str(run_dir), "--class", "Bag", "--steps", "2"), "give --stencil")
    one_line_error(run("sample.py", str(trained_tiny_run), "--stencil", str(tmp_path / "stencil.png")),
                   "--stencil is for a 'stencil' run")
    one_line_error(run("sample.py", str(trained_tiny_run), "--mirror", "Bag"), "--mirror needs a run that takes mirror")

    page = Explorer(run_dir)
    assert [i.name for i in page.inputs] == ["stencil"] and list(page.conditions) == ["class", "mirror"]
    for kind in ("class", "mirror"):
        answer = page.generate(Request(condition=kind, value="Bag", n=3, steps=2,
                                       inputs={"stencil": str(tmp_path / "stencil.png")}))
        assert f"--{kind} Bag" in answer.command and "--stencil" in answer.command
        assert same_as_command(answer, tmp_path) and np.array_equal(answer.images.numpy(), arrays[kind])
    with pytest.raises(UserError, match="upload the stencil"):
        page.generate(Request(value="Bag", n=3, steps=2))


PACKAGES = ("ddpm", "latent", "conditioning")


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path, modules: set[str]) -> set[str]:
    """The project modules a module imports anywhere in it (inside functions too), and those a string
    "module:Class" names (the stage registry's, which ``importlib`` imports)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            found.add(node.value.split(":")[0])
    resolved = set()
    for imported in found:
        while imported and imported not in modules:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            resolved.add(imported)
    return resolved


def test_no_import_cycles():
    """No module of ddpm, latent or conditioning imports one that imports it back, however indirectly,
    counting imports inside functions and the registry's module paths."""
    paths = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {name: project_imports(path, set(paths)) for name, path in paths.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    for name in graph:
        assert name not in reaches(name), f"{name} imports a module that imports it back: " \
            f"{sorted(m for m in graph[name] if name in reaches(m))}"


def test_dependencies_point_one_way():
    """ddpm imports neither later stage; latent does not import conditioning."""
    for package, forbidden in (("ddpm", {"latent", "conditioning"}), ("latent", {"conditioning"})):
        for module in (ROOT / package).glob("*.py"):
            assert not imports_of(module) & forbidden, f"{package}/{module.name} imports {forbidden}"


if __name__ == "__main__":  # record the reference losses again (one thread)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps(train_tiny_runs(Path(tmp)), indent=1) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
