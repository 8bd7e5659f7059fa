"""The web page (``sample.py RUN --web``): its functions in-process, and the page in a real browser.

The browser test needs Debian's ``chromium`` and Playwright; it is skipped without them, except
where ``SDSTEPS_REQUIRE_BROWSER=1`` (CI sets it, and installs both) makes that a failure.
"""

import dataclasses
import importlib.util
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.web_page import CHROMIUM, PageDriver, chromium, served
from ddpm.errors import UserError
from ddpm.web import Explorer, Request

from .conftest import one_line_error, run, same_as_command


@pytest.fixture(scope="module")
def explorer(trained_tiny_run):
    return Explorer(trained_tiny_run)


def test_the_page_makes_what_its_command_makes(explorer, tmp_path):
    steps = []
    result = explorer.generate(Request(class_name="bag", guidance=2.0, steps=4, seed=3, n=5),
                               on_progress=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "--class Bag --n 5 --scheduler dpm++ --steps 4 --guidance 2.0 --seed 3" in result.command
    assert result.images.shape == (5, 28, 28) and result.images.dtype == torch.uint8
    assert result.grid.shape == (2 + 114, 2 + 5 * 114)  # one row of five, 4x, 2-pixel frames
    assert result.trajectory_steps == [(1, 999), (2, 749), (3, 499), (4, 249)]  # every step, of 4
    assert result.trajectory.shape == (2 + 2 * 114, 2 + 4 * 114)  # x_t above x0_hat, a column per step
    long = explorer.generate(Request(class_name="bag", steps=20, n=1))
    assert [i for i, _ in long.trajectory_steps] == [1, 4, 7, 10, 13, 16, 19, 20]
    assert same_as_command(result, tmp_path)
    other_seed = explorer.generate(Request(class_name="bag", guidance=2.0, steps=4, seed=4, n=5))
    assert not torch.equal(other_seed.images, result.images)


def test_img2img_input_is_kept_in_the_run_for_the_command(explorer, tmp_path):
    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(upload)
    result = explorer.generate(Request(class_name="0", steps=4, n=3, init_image=str(upload), strength=0.5))
    kept = shlex.split(result.command)[shlex.split(result.command).index("--init-image") + 1]
    assert kept.startswith(str(explorer.inputs_dir)) and kept.endswith(".png")
    assert same_as_command(result, tmp_path)


@pytest.mark.parametrize("change, says", [
    ({"steps": 0}, "steps must be a whole number from 1 to 1000, got 0"),
    ({"steps": 1001}, "steps must be a whole number from 1 to 1000"),
    ({"steps": None}, "steps must be a whole number"),
    ({"n": 65}, "images must be a whole number from 1 to 64"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"guidance": 25.0}, "guidance must be from 0 to 20"),
    ({"strength": 1.5}, "strength must be from 0 to 1"),
    ({"class_name": "hat"}, "unknown class 'hat'"),
    ({"condition": "prompt", "prompt": "a bag"}, "this run is asked for class, not 'prompt'"),
    ({"negative_prompt": "a shoe"}, "a negative prompt needs a text run"),
    ({"scheduler": "heun"}, "unknown scheduler 'heun'"),
    ({"init_image": __file__}, "is not an image file"),
])
def test_bad_requests_get_one_line_saying_what_to_change(explorer, change, says):
    with pytest.raises(UserError, match=re.escape(says)):
        explorer.generate(dataclasses.replace(explorer.defaults(), **{"steps": 4, **change}))


def test_web_without_gradio_says_how_to_install_it(trained_tiny_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    one_line_error(run("sample.py", str(trained_tiny_run), "--web"), "pip install -e '.[web]'")


@pytest.fixture(scope="module")
def browser():
    missing = None
    if importlib.util.find_spec("playwright") is None:
        missing = "Playwright (pip install -e '.[web,dev]')"
    if not os.path.isfile(CHROMIUM):
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("SDSTEPS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test needs {missing}")
        pytest.skip(f"the browser test needs {missing}")
    with chromium() as b:
        yield b


def test_the_page_in_a_real_browser(explorer, browser):
    """Load the page, choose a class and a guidance, generate: the grid that arrives in the browser
    is the one the same request makes in-process. Then bad input gets a message on the page, and
    the page still answers."""
    with served(explorer) as url:
        driver = PageDriver(browser.new_page(), url)
        driver.choose_class("Bag")
        driver.set_number("number input for Guidance w", 2)
        driver.set_number("Steps (1-1000)", 4)
        pixels, _ = driver.generate()
        expected = explorer.generate(Request(class_name="Bag", guidance=2.0, steps=4))
        assert np.array_equal(pixels, expected.grid)
        assert "--class Bag --n 8 --scheduler dpm++ --steps 4 --guidance 2.0 --seed 0" in driver.text("#command")
        assert driver.text("#timing").startswith("8 images in ")
        assert np.array_equal(driver.image_pixels(driver.page.locator("#trajectory img").get_attribute("src")),
                              expected.trajectory)

        driver.set_number("Steps (1-1000)", 0)
        driver.page.get_by_role("button", name="Generate").click()
        driver.page.get_by_text("steps must be a whole number from 1 to 1000, got 0").wait_for()

        driver.set_number("Steps (1-1000)", 4)
        driver.set_number("Seed", 1)
        pixels, _ = driver.generate()
        assert np.array_equal(pixels, explorer.generate(Request(class_name="Bag", guidance=2.0, steps=4, seed=1)).grid)
