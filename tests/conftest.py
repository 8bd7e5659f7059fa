"""Shared fixtures: tiny configs, a trained tiny run, and fake IDX datasets.

Everything runs on the CPU, offline. Tests that need the real Fashion-MNIST skip with the
install hint when it is absent (CI installs it).
"""

from __future__ import annotations

import copy
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

# `make test` runs the suite on every core with pytest-xdist: one thread per worker, and for the
# processes the tests start, so that the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from ddpm.config import read_yaml
from ddpm.data import load_fashion_mnist
from ddpm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ddpm_fashion_tiny.yaml"
TINY_AUTOENCODER = ROOT / "configs" / "autoencoder_fashion_tiny.yaml"
TINY_LATENT = ROOT / "configs" / "latent_fashion_tiny.yaml"
SHARED_MODELS = ROOT.parent / "shared" / "models"
SLOWEST_FIRST = ("test_notebook_runs", "test_two_processes_train", "test_kill_9_mid_run")  # the longest, 30 s to 3 min


def pytest_collection_modifyitems(items):
    """Run the longest tests first, so that parallel workers end together rather than one
    starting a notebook when the other has nothing left (with --maxschedchunk 1, xdist deals
    the tests out two at a time, in this order)."""
    items.sort(key=lambda item: not item.name.startswith(SLOWEST_FIRST))


@pytest.fixture(scope="session")
def fashion_mnist():
    try:
        return load_fashion_mnist("train", hub_name=None)
    except UserError as e:
        pytest.skip(f"real Fashion-MNIST not installed: {e}")


def tiny_config(output_dir: Path, preset: Path = TINY, **sections) -> dict:
    """A tiny preset with ``train.output_dir`` set and sections updated key by key."""
    raw = copy.deepcopy(read_yaml(preset))
    raw["train"]["output_dir"] = str(output_dir)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory, fashion_mnist):
    """A finished tiny stage-1 run, shared by the tests that only read it."""
    import train

    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "tiny"))


@pytest.fixture(scope="session")
def trained_tiny_autoencoder(tmp_path_factory, fashion_mnist):
    """A finished tiny autoencoder run (with its discriminator switched on halfway)."""
    import train

    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "autoencoder", TINY_AUTOENCODER))


@pytest.fixture(scope="session")
def trained_tiny_latent_run(tmp_path_factory, trained_tiny_autoencoder):
    """A finished tiny latent-diffusion run on the tiny autoencoder's latents."""
    import train

    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "latent", TINY_LATENT,
                                   autoencoder={"source": str(trained_tiny_autoencoder)}))


def checkpoint_weights(checkpoint: Path) -> dict:
    """The model and EMA tensors of one checkpoint folder, EMA keys prefixed ``ema.``."""
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors") | {
        f"ema.{k}": v for k, v in load_file(checkpoint / "ema" / "diffusion_pytorch_model.safetensors").items()}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_idx_dir(tmp_path) -> Path:
    """A folder with four small, valid IDX files (64 train, 16 test images)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path
