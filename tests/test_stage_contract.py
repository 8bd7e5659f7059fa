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
import json
import sys

import pytest
import torch

import train
from ddpm.contract import CONDITIONS, Capabilities, Stage
from ddpm.diffusion_stage import DiffusionStage
from ddpm.runs import STAGES, stage_class

from .conftest import ROOT, TINY, TINY_AUTOENCODER, TINY_LATENT, losses, tiny_config

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
    assert isinstance(can, Capabilities) and set(can.conditions) <= set(CONDITIONS)
    # what sample.py relies on: a stage that generates is a diffusion stage asked for classes
    assert can.generates == issubclass(cls, DiffusionStage)
    assert can.generates == ("class" in can.conditions)
    for method in ("load_data", "make_batch", "build_model", "loss", "preview", "save_final", "load_model"):
        assert getattr(cls, method) is not getattr(Stage, method), f"{name} does not implement {method}"
    if can.evaluates:
        assert cls.evaluate is not Stage.evaluate
    if "prompt" in can.conditions:
        assert cls.generate_prompts is not Stage.generate_prompts


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
