"""train.py and sample.py as a user runs them: end to end, and their one-line errors."""

import numpy as np

from .conftest import TINY, command, one_line_error, run


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
    one_line_error(run("sample.py", str(trained_tiny_run), "sample.guidance_interval=[600, 100]"),
                   "sample.guidance_interval must be [lo, hi]")
    one_line_error(run("sample.py", str(trained_tiny_run), "model.layers_per_block=2"),
                   "what the run was trained with", "sample.guidance=5")
    one_line_error(run("sample.py", str(trained_tiny_run), "sample.guidence=5"), "unknown key config.sample.guidence")
    one_line_error(run("sample.py", str(trained_tiny_run), "--phrasings", "unseen"),
                   "--phrasings needs a run that takes prompts")


def test_sampling_options_on_the_command_line(tmp_path, trained_tiny_run):
    common = ("--class", "3", "--n", "2", "--steps", "3", "--guidance", "4")
    arrays = {}
    for name, options in (("default", ()), ("interval", ("sample.guidance_interval=[0, 500]",)),
                          ("unclipped", ("sample.clip_denoised=false",))):
        result = run("sample.py", str(trained_tiny_run), *common, *options, "--out", str(tmp_path / f"{name}.png"),
                     "--save-array", str(tmp_path / f"{name}.npy"))
        assert result.returncode == 0, result.stderr
        arrays[name] = np.load(tmp_path / f"{name}.npy")
    assert not np.array_equal(arrays["default"], arrays["interval"])
    assert not np.array_equal(arrays["default"], arrays["unclipped"])


def test_sample_grid_rows_are_as_even_as_they_can_be():
    import torch

    from ddpm.plots import rows_of

    images = torch.arange(2 * 10).to(torch.uint8)[:, None, None].expand(-1, 28, 28)
    grid, titles = rows_of(images, ["a", "b"], 10)  # 10 a row: two rows of 5, not 8 and 2
    assert grid.shape[:2] == (4, 5) and titles == ["a", "", "b", ""]
    assert grid[:, :, 0, 0].flatten().tolist() == list(range(20))  # every image once, in order, no blanks
    assert rows_of(images[:16], ["a"], 16)[0].shape[:2] == (2, 8)
    assert rows_of(images[:6], ["a"], 6)[0].shape[:2] == (1, 6)
