"""Shared fixtures and helpers: tiny configs, trained tiny runs, fake IDX datasets, the CLIs
run in-process, and the resume and two-process checks every stage's tests use.

Everything runs on the CPU, offline. Tests that need the real Fashion-MNIST skip with the
install hint when it is absent (CI installs it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import importlib.util
import io
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# `make test` runs the suite on every core with pytest-xdist: one thread per worker, and for the
# processes the tests start, so that the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import sample  # noqa: E402
from benchmarks.web_page import free_port  # noqa: E402
import train  # noqa: E402
from ddpm.config import read_yaml  # noqa: E402
from ddpm.data import load_fashion_mnist  # noqa: E402
from ddpm.errors import UserError  # noqa: E402
from ddpm.plots import read_metrics  # noqa: E402
from ddpm.runs import load_config, load_run  # noqa: E402

from .process_probe import main as train_and_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ddpm_fashion_tiny.yaml"
TINY_AUTOENCODER = ROOT / "configs" / "autoencoder_fashion_tiny.yaml"
TINY_EMOJI = ROOT / "configs" / "ddpm_emoji_tiny.yaml"
TINY_LATENT = ROOT / "configs" / "latent_fashion_tiny.yaml"
TINY_TEXT = ROOT / "configs" / "text_fashion_tiny.yaml"
TINY_CLIP = ROOT / "configs" / "clip_fashion_tiny.yaml"
TINY_LOCKED_CLIP = ROOT / "configs" / "clip_fashion_locked_tiny.yaml"
TINY_ALIGNED_CLIP = ROOT / "configs" / "clip_fashion_aligned_tiny.yaml"
TINY_DREAMBOOTH = ROOT / "configs" / "dreambooth_fashion_tiny.yaml"
SHARED_MODELS = ROOT.parent / "shared" / "models"
SLOWEST_FIRST = ("test_notebook_runs", "test_two_processes_train", "test_the_book_trains", "test_every_stage",  # 30 s
                 "test_kill_9_mid_run", "test_sigterm_to_accelerate_launch")  # to 3 min


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
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "tiny"))


@pytest.fixture(scope="session")
def trained_tiny_emoji_run(tmp_path_factory):
    """A finished tiny stage-1 run on the 18 emoji of tests/data/emoji_32, in colour."""
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "emoji", TINY_EMOJI,
                                   data={"path": str(ROOT / "tests" / "data" / "emoji_32")}))


@pytest.fixture(scope="session")
def trained_tiny_autoencoder(tmp_path_factory, fashion_mnist):
    """A finished tiny autoencoder run (with its discriminator switched on halfway)."""
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "autoencoder", TINY_AUTOENCODER))


@pytest.fixture(scope="session")
def trained_tiny_latent_run(tmp_path_factory, trained_tiny_autoencoder):
    """A finished tiny latent-diffusion run on the tiny autoencoder's latents."""
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "latent", TINY_LATENT,
                                   autoencoder={"source": str(trained_tiny_autoencoder)}))


def make_tiny_clip_folder(folder: Path) -> Path:
    """A random tiny CLIP text model with the real CLIP tokenizer (built offline, spare tokens too),
    saved in ``folder``; the same weights every time."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from conditioning.clip.stage import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A random tiny CLIP text model with the real CLIP tokenizer."""
    return make_tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def trained_tiny_text_run(tmp_path_factory, tiny_clip_folder, trained_tiny_autoencoder):
    """A finished tiny text run on the tiny CLIP text model and the tiny autoencoder."""
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "text", TINY_TEXT,
                                   autoencoder={"source": str(trained_tiny_autoencoder)},
                                   text_encoder={"source": str(tiny_clip_folder)}))


@pytest.fixture(scope="session")
def image_runs(tmp_path_factory, trained_tiny_text_run):
    """A finished tiny run of each image-conditioned stage, started from the tiny text run."""
    root = tmp_path_factory.mktemp("image_runs")
    return {name: train.train({**tiny_config(root / name, ROOT / "configs" / f"{name}_fashion_tiny.yaml"),
                               "init_from": str(trained_tiny_text_run)})
            for name in ("upscale", "inpaint", "structure")}


def dreambooth_config(output_dir, init_from, **sections) -> dict:
    raw = tiny_config(output_dir, TINY_DREAMBOOTH, **sections)
    raw["init_from"] = str(init_from)
    return raw


@pytest.fixture(scope="session")
def tiny_dreambooth_runs(tmp_path_factory, trained_tiny_text_run):
    """Finished tiny DreamBooth fine-tunes of the tiny text run: the whole UNet ("full") and LoRA ("lora")."""
    root = tmp_path_factory.mktemp("dreambooth")
    return {"full": train.train(dreambooth_config(root / "full", trained_tiny_text_run)),
            "lora": train.train(dreambooth_config(root / "lora", trained_tiny_text_run, lora={"rank": 2}))}


@pytest.fixture(scope="session")
def trained_tiny_clip(tmp_path_factory, fashion_mnist):
    """A finished tiny CLIP run (both towers)."""
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "clip", TINY_CLIP))


@pytest.fixture(scope="session")
def trained_tiny_locked_clip(tmp_path_factory, fashion_mnist):
    """A finished tiny CLIP run with a locked text tower (all-MiniLM-L6-v2) and a conv image tower."""
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "locked_clip", TINY_LOCKED_CLIP))


def losses(run_dir: Path) -> list[float]:
    """The training loss of every logged window of a run, in order (evaluation records apart)."""
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def checkpoint_weights(checkpoint: Path) -> dict:
    """The model and EMA tensors of one checkpoint folder, EMA keys prefixed ``ema.``."""
    from safetensors.torch import load_file

    from ddpm.checkpoint import weights_file

    return load_file(checkpoint / "model.safetensors") | {
        f"ema.{k}": v for k, v in load_file(weights_file(checkpoint / "ema")).items()}


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


# -- the command lines ------------------------------------------------------------------


def command(*args, env=None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a new interpreter, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(script: str, *args: str, env: dict | None = None) -> Result:
    """``python train.py|sample.py ARGS`` from the repository root, but in this process: its
    ``main`` with the environment updated by ``env``, and what it printed. It saves an interpreter
    start-up per call; ``test_train_and_sample_end_to_end`` runs the real command lines."""
    main = {"train.py": train.main, "sample.py": sample.main}[script]
    out, err, saved_env, cwd = io.StringIO(), io.StringIO(), dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def needs_browser() -> None:
    """Skip the test without Playwright and Debian's chromium, or fail where ``SDSTEPS_REQUIRE_BROWSER=1``
    (CI sets it, and installs both)."""
    from benchmarks.web_page import CHROMIUM

    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "Playwright (pip install -e '.[web,dev]')"
    if not os.path.isfile(CHROMIUM):
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("SDSTEPS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test needs {missing}")
        pytest.skip(f"the browser test needs {missing}")


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def same_as_command(result, tmp_path) -> bool:
    """Run the page's ``sample.py`` command; are its images the page's, pixel for pixel?"""
    saved = tmp_path / "command.npy"
    done = run("sample.py", *shlex.split(result.command)[2:], "--save-array", str(saved),
               "--out", str(tmp_path / "command.png"))
    assert done.returncode == 0, done.stderr
    return torch.equal(torch.from_numpy(np.load(saved)), result.images)


# -- exact resume and two processes, for every stage ----------------------------------------


def assert_resume_is_exact(straight, resumed):
    """A 6-step run, continued from its step-3 checkpoint in another folder, ends the same."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    shutil.copytree(straight / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    raw = read_yaml(straight / "config.yaml")
    raw["train"].update(output_dir=str(resumed), resume="latest")
    train.train(raw)
    assert losses(resumed) == losses(straight)[3:]
    a, b = (checkpoint_weights(run / "checkpoints" / "step-00000006") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# float32 sums in another order. Adam moves a weight by about lr at first whatever the size of
# its gradient, so where a gradient is close to 0 its rounding shows in the weight: lr is 2e-3
# in the tiny presets, and we allow a twentieth of one such step.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
ONE_THREAD = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def launch_arguments(processes: int = 2) -> list[str]:
    """``-m accelerate.commands.launch`` on the CPU with ``processes`` processes (a gloo group) and a free
    port for their rendezvous, so that two tests can launch at once."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
            "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]


def accelerate_launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` on the CPU with ``processes`` processes (a gloo group) of one thread each."""
    cmd = [sys.executable, *launch_arguments(processes), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs of one config logged the same losses and ended with the same weights and EMA,
    within TOLERANCE; one metrics line per step in each (only a main process writes)."""
    la, lb = losses(a), losses(b)
    steps = load_run(a)[1].max_steps
    assert len(la) == len(lb) == steps, "one metrics line per step: only the main process writes"
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), **TOLERANCE)
    last = f"step-{steps:08d}"
    wa, wb = (checkpoint_weights(run / "checkpoints" / last) for run in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("k_proj.bias"):
            # an attention key's bias adds the same amount to every key's score, which softmax
            # ignores: its gradient is 0 but for rounding, which Adam turns into steps of lr
            continue
        torch.testing.assert_close(wa[k], wb[k], **TOLERANCE, msg=lambda m: f"{k}: {m}")


def assert_two_processes_train_like_one(tmp_path: Path, config: Path, *overrides: str) -> None:
    """The same config trained by two processes and by one (tests/process_probe.py records what
    each process trained on): at every step the two micro-batches are disjoint and together
    exactly the one-process batch, and both processes hold the same weights; each epoch deals the
    examples out afresh; losses and final weights match the one-process run; only the main
    process writes grids and metrics."""
    batch_size = load_config(tiny_config(tmp_path, config))[1].batch_size
    # two steps an epoch, no flips: an example's clean input is its image
    overrides = (f"data.limit={2 * batch_size}", "data.flip=false", *overrides)
    probe = ["tests/process_probe.py", str(config)]
    two, one = tmp_path / "two", tmp_path / "one"
    result = accelerate_launch(*probe, str(two / "probe"), f"train.output_dir={two}", *overrides)
    assert "2 process(es)" in result.stderr + result.stdout
    train_and_record(str(config), str(one / "probe"), f"train.output_dir={one}", *overrides)  # here: one start-up less

    whole, rank0, rank1 = (json.loads((run / "probe" / f"rank-{r}.json").read_text())
                           for run, r in ((one, 0), (two, 0), (two, 1)))
    assert len(whole) == len(rank0) == len(rank1) >= 4
    for step, (a, b, both) in enumerate(zip(rank0, rank1, whole)):
        assert a["weights"] == b["weights"], f"the processes' weights differ before step {step}"
        assert not set(a["examples"]) & set(b["examples"]), f"both processes trained on one example at step {step}"
        assert sorted(a["examples"] + b["examples"]) == sorted(both["examples"]), step
    for e in range(0, len(rank0) - 1, 2):  # every example once an epoch
        assert len({i for call in rank0[e : e + 2] + rank1[e : e + 2] for i in call["inputs"]}) == 2 * batch_size
    assert rank0[0]["inputs"] != rank0[2]["inputs"], "process 0 got the same shard in epochs 0 and 1"

    assert_same_training(one, two)
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["final.png"]
