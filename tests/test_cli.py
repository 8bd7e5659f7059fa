"""train.py and sample.py as a user runs them: end to end, and their one-line errors."""

import contextlib
import dataclasses
import io
import os
import subprocess
import sys

import numpy as np

import sample
import train

from .conftest import ROOT, TINY


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


def test_train_and_sample_end_to_end(tmp_path, fashion_mnist):
    out = tmp_path / "run"
    result = command("train.py", str(TINY), f"train.output_dir={out}", "train.max_steps=4")
    assert result.returncode == 0, result.stderr
    assert (out / "final" / "unet" / "config.json").is_file()
    grid, arrays = tmp_path / "boots.png", tmp_path / "boots.npy"
    result = command("sample.py", str(out), "--class", "ankle boot", "--class", "0", "--n", "3", "--steps", "2",
                 "--out", str(grid), "--save-array", str(arrays))
    assert result.returncode == 0, result.stderr
    assert grid.stat().st_size > 1000
    images, labels = np.load(arrays), np.load(tmp_path / "boots_labels.npy")
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [9, 9, 9, 0, 0, 0]
    # any checkpoint samples too
    result = run("sample.py", str(out / "checkpoints" / "step-00000004"), "--class", "all", "--n", "1",
                 "--steps", "2", "--out", str(tmp_path / "all.png"))
    assert result.returncode == 0, result.stderr


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_config_key_is_one_line_error(tmp_path):
    one_line_error(run("train.py", str(TINY), "train.lrr=1", f"train.output_dir={tmp_path}"),
                   "unknown key train.lrr", "valid keys in train:")


def test_missing_dataset_is_one_line_error(tmp_path):
    result = run("train.py", str(TINY), f"train.output_dir={tmp_path}",
                 env={"FASHION_MNIST_DIR": str(tmp_path / "nowhere")})
    one_line_error(result, "apt-get install dataset-fashion-mnist", "FASHION_MNIST_DIR")


def test_sample_errors_are_one_line(tmp_path, trained_tiny_run):
    one_line_error(run("sample.py", str(trained_tiny_run), "--class", "boot"), "unknown class 'boot'", "9='Ankle boot'")
    one_line_error(run("sample.py", str(tmp_path)), "is not a run directory")
