"""Golden values: every registered stage trains and samples to the last bit as it did when they were
recorded, so that a refactor of the stages can show it changed nothing.

For each stage's tiny config (the fine-tunes from one tiny text run on a tiny CLIP text model) a
run is trained in this process with one torch thread; ``data/golden.json`` holds the losses of
its steps and the SHA-256 of its preview grid (uint8 images, the fixed-seed samples for a
diffusion stage), made from the run as ``sample.py`` loads it. Recorded on this workplace's CPU
with ``python -m tests.test_golden``; another CPU may round differently.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

import train
from ddpm.plots import save_grid
from ddpm.runs import STAGES, load_for_sampling

from .conftest import ROOT, losses, make_tiny_clip_folder, tiny_config

GOLDEN = ROOT / "tests" / "data" / "golden.json"
CONFIGS = ROOT / "configs"


def grid_digest(stage, model, path: Path) -> str:
    """The SHA-256 of the images the stage's ``preview`` puts in its grid (the PNG itself is not hashed)."""
    grids = []

    def capture(images, *args, **kwargs):
        grids.append(images.contiguous())
        return save_grid(images, *args, **kwargs)

    patched = [m for name, m in sys.modules.items() if name.split(".")[0] in ("ddpm", "latent", "conditioning")
               and getattr(m, "save_grid", None) is save_grid]
    for module in patched:
        module.save_grid = capture
    try:
        stage.preview(model, path)
    finally:
        for module in patched:
            module.save_grid = save_grid
    (images,) = grids
    return f"{images.dtype} {list(images.shape)} " + hashlib.sha256(images.numpy().tobytes()).hexdigest()


def record(run_dir: Path) -> dict:
    """A finished run's losses and preview digest, the run loaded as ``sample.py`` loads it."""
    stage, model, _ = load_for_sampling(run_dir)
    return {"losses": losses(run_dir), "grid": grid_digest(stage, model, run_dir / "golden.png")}


def train_every_stage(root: Path) -> dict[str, dict]:
    """A tiny run of every registered stage (DreamBooth also with LoRA), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}

        def trained(name: str, config: str, **sections) -> Path:
            raw = tiny_config(root / name, CONFIGS / config)
            raw.update(sections)
            runs[name] = train.train(raw)
            return runs[name]

        autoencoder = trained("autoencoder", "autoencoder_fashion_tiny.yaml")
        on_it = {"source": str(autoencoder)}
        trained("ddpm", "ddpm_fashion_tiny.yaml")
        trained("latent", "latent_fashion_tiny.yaml", autoencoder=on_it)
        trained("clip", "clip_fashion_tiny.yaml")
        clip_text = make_tiny_clip_folder(root / "tiny_clip")
        text = trained("text", "text_fashion_tiny.yaml", autoencoder=on_it, text_encoder={"source": str(clip_text)})
        trained("dreambooth", "dreambooth_fashion_tiny.yaml", init_from=str(text))
        trained("dreambooth_lora", "dreambooth_fashion_tiny.yaml", init_from=str(text), lora={"rank": 2})
        for name in ("upscale", "inpaint", "structure"):
            trained(name, f"{name}_fashion_tiny.yaml", init_from=str(text))
        return {name: record(run) for name, run in runs.items()}
    finally:
        torch.set_num_threads(threads)


def test_every_stage_trains_and_samples_to_the_last_bit(tmp_path, fashion_mnist):
    golden = json.loads(GOLDEN.read_text())
    assert set(STAGES) <= {name.removesuffix("_lora") for name in golden}, "a registered stage has no golden values"
    made = train_every_stage(tmp_path)
    assert made.keys() == golden.keys()
    for name, expected in golden.items():
        assert made[name]["losses"] == expected["losses"], name
        assert made[name]["grid"] == expected["grid"], name


if __name__ == "__main__":  # record the golden values again (one thread)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(train_every_stage(Path(tmp)), indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
