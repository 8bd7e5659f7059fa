"""The web page (``sample.py RUN --web``): its functions in-process, the page in a real browser, and
the served page under load: many clients at once, limits, cancelled requests, memory.

The browser test needs Debian's ``chromium`` and Playwright; it is skipped without them, except
where ``SDSTEPS_REQUIRE_BROWSER=1`` (CI sets it, and installs both) makes that a failure.
"""

import dataclasses
import os
import re
import shlex
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.web_page import PageDriver, chromium, generate_request, served, serving
from ddpm.errors import UserError
from ddpm.web import Busy, Cancelled, Explorer, Line, Request, Ticket

from .conftest import needs_browser, one_line_error, run, same_as_command


@pytest.fixture(scope="module")
def explorer(trained_tiny_run):
    return Explorer(trained_tiny_run)


def test_the_page_makes_what_its_command_makes(explorer, tmp_path):
    steps = []
    result = explorer.generate(Request(value="bag", guidance=2.0, steps=4, seed=3, n=5),
                               on_progress=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "--class Bag --n 5 --scheduler dpm++ --steps 4 --guidance 2.0 --seed 3" in result.command
    assert result.images.shape == (5, 28, 28) and result.images.dtype == torch.uint8
    assert result.grid.shape == (2 + 114, 2 + 5 * 114)  # one row of five, 4x, 2-pixel frames
    assert result.trajectory_steps == [(1, 999), (2, 749), (3, 499), (4, 249)]  # every step, of 4
    assert result.trajectory.shape == (2 + 2 * 114, 2 + 4 * 114)  # x_t above x0_hat, a column per step
    long = explorer.generate(Request(value="bag", steps=20, n=1))
    assert [i for i, _ in long.trajectory_steps] == [1, 4, 7, 10, 13, 16, 19, 20]
    assert same_as_command(result, tmp_path)
    other_seed = explorer.generate(Request(value="bag", guidance=2.0, steps=4, seed=4, n=5))
    assert not torch.equal(other_seed.images, result.images)


def test_img2img_input_is_kept_in_the_run_for_the_command(explorer, tmp_path):
    upload = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(upload)
    result = explorer.generate(Request(value="0", steps=4, n=3, init_image=str(upload), strength=0.5))
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
    ({"value": "hat"}, "unknown class 'hat'"),
    ({"condition": "prompt", "value": "a bag"}, "this run is asked for class, not 'prompt'"),
    ({"negative_prompt": "a shoe"}, "a negative prompt needs a run that takes prompts"),
    ({"scheduler": "heun"}, "unknown scheduler 'heun'"),
    ({"init_image": __file__}, "is not an image file"),
    ({"n": 64, "steps": 26}, "64 images x 26 steps is more than this page makes for one request (1600)"),
])
def test_bad_requests_get_one_line_saying_what_to_change(explorer, change, says):
    with pytest.raises(UserError, match=re.escape(says)):
        explorer.generate(dataclasses.replace(explorer.defaults(), **{"steps": 4, **change}))


def test_the_page_refuses_limits_that_cannot_serve(trained_tiny_run):
    one_line_error(run("sample.py", str(trained_tiny_run), "--web", "--max-image-steps", "0"),
                   "the page's limits must be positive", "--max-image-steps 0")


def test_web_without_gradio_says_how_to_install_it(trained_tiny_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    one_line_error(run("sample.py", str(trained_tiny_run), "--web"), "pip install -e '.[web]'")


@pytest.fixture(scope="module")
def browser():
    needs_browser()
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
        expected = explorer.generate(Request(value="Bag", guidance=2.0, steps=4))
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
        assert np.array_equal(pixels, explorer.generate(Request(value="Bag", guidance=2.0, steps=4, seed=1)).grid)

        # Stop while it generates: the line is free at once, the last images stay
        shown = driver.page.locator("#grid img").get_attribute("src")
        driver.set_number("Steps (1-1000)", 1000)
        driver.set_number("number input for Images", 1)
        driver.page.get_by_role("button", name="Generate").click()
        # the progress line, not the last answer's caption ("Denoising the first image ..."): case matters
        driver.page.get_by_text(re.compile("denoising")).first.wait_for()
        deadline = time.monotonic() + 20
        while len(explorer.line) == 0 and time.monotonic() < deadline:  # the request holds its turn
            time.sleep(0.05)
        driver.page.get_by_role("button", name="Stop").click()
        driver.page.locator("#timing").get_by_text("stopped").wait_for(timeout=20_000)
        assert len(explorer.line) == 0 and driver.page.locator("#grid img").get_attribute("src") == shown


# -- many users at once ----------------------------------------------------------------------


def test_the_line_answers_in_order_tells_the_waiting_their_place_and_refuses_past_its_size():
    line, order, places = Line(max_waiting=2), [], {}
    first, second, third = Ticket(), Ticket(), Ticket()
    with line.turn(first):
        def wait(name, ticket):
            with line.turn(ticket, on_wait=lambda ahead: places.setdefault(name, []).append(ahead)):
                order.append(name)
                deadline = time.time() + 10
                while name == "second" and len(places["third"]) < 2 and time.time() < deadline:
                    time.sleep(0.01)  # until the third has seen its place change

        waiting = [threading.Thread(target=wait, args=("second", second))]
        waiting[0].start()
        while len(line) < 2:
            time.sleep(0.01)
        waiting.append(threading.Thread(target=wait, args=("third", third)))
        waiting[1].start()
        while len(line) < 3:
            time.sleep(0.01)
        with pytest.raises(Busy, match="busy: 3 requests ahead of yours"):
            with line.turn(Ticket()):
                pass
    for thread in waiting:
        thread.join(timeout=10)
    assert order == ["second", "third"]
    assert places == {"second": [1], "third": [2, 1]}
    assert len(line) == 0


def test_a_cancelled_request_leaves_the_line_or_stops_between_steps(explorer):
    line, waiting = explorer.line, Ticket("tab-1")
    with line.turn(Ticket()):
        thread_error = []
        thread = threading.Thread(target=lambda: thread_error.append(
            pytest.raises(Cancelled, explorer.answer, Request(value="Bag", steps=4, n=1), waiting)))
        thread.start()
        while len(line) < 2:
            time.sleep(0.01)
        line.cancel_session("tab-1")  # the tab was closed while it waited
        thread.join(timeout=10)
        assert thread_error and len(line) == 1
    generating, steps = Ticket(), []

    def cancel_after_two(i, n):
        steps.append(i)
        if i == 2:
            generating.cancel()  # Stop pressed while it generates

    with pytest.raises(Cancelled):
        explorer.answer(Request(value="Bag", steps=10, n=1), generating, on_progress=cancel_after_two)
    assert steps == [1, 2] and len(line) == 0


@pytest.fixture(scope="module")
def server(trained_tiny_run):
    """``sample.py RUN --web --max-waiting 3`` in its own process, with the torch threads of this one
    (the same sums, so the same pixels as the in-process explorer): (URL, process id)."""
    pytest.importorskip("gradio_client")
    with serving(trained_tiny_run, "--max-waiting", "3") as (url, proc):
        yield url, proc.pid


def ask(client, seed: int = 0, steps: int = 4, n: int = 8, init_image=None):
    """Generate on the served page, as ``explorer`` is asked in these tests: its grid PNG, timing, command..."""
    return generate_request(client, seed, "Bag", n, steps, 2.0, "dpm++", init_image).result()


def grid_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def test_twenty_clients_at_once_get_their_images_or_busy(server, explorer):
    from gradio_client import Client

    url, _ = server
    clients = [None] * 20
    threads = [threading.Thread(target=lambda i=i: clients.__setitem__(i, Client(url, verbose=False)))
               for i in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    answers, start = [None] * 20, threading.Barrier(20)

    def one_client(i):
        start.wait()
        try:
            answers[i] = ask(clients[i], seed=i, steps=40)
        except Exception as e:  # gradio_client's AppError: the page's message
            answers[i] = str(e)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(20)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    busy = [i for i, a in enumerate(answers) if isinstance(a, str)]
    answered = [i for i, a in enumerate(answers) if not isinstance(a, str)]
    assert all(re.fullmatch(r"busy: [1-4] requests ahead of yours, as many as this page lets wait; try again "
                            r"in a moment", answers[i]) for i in busy), [answers[i] for i in busy]
    assert len(answered) >= 4 and busy, "the line of 1 + 3 fills: some are answered, the rest told it is busy"
    for i in answered:
        expected = explorer.generate(Request(value="Bag", guidance=2.0, steps=40, seed=i))
        assert np.array_equal(grid_pixels(answers[i][0]), expected.grid), f"client {i} got other pixels"
        assert f"--seed {i}" in answers[i][2]
    assert ask(clients[0], seed=99, n=1)[1].startswith("1 images in ")  # and the page still answers


def test_over_the_limits_one_line_each(server, tmp_path):
    from gradio_client import Client
    import httpx

    url, _ = server
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(50 * 2**20))
    with open(big, "rb") as f:
        refused = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", f, "image/png")}, timeout=60)
    assert refused.status_code == 413 and refused.text == "File size exceeded maximum allowed size of 5242880 bytes."
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match=r"^8 images x 1000 steps is more than this page makes for one request "
                                        r"\(1600\): ask for fewer images or steps, or use the command$"):
        ask(client, steps=1000)
    assert ask(client, n=1)[1].startswith("1 images in ")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_waiting_request_sees_its_place_and_cancelled_requests_stop_their_work(server):
    from gradio_client import Client

    url, pid = server
    long_one, waiting = Client(url, verbose=False), Client(url, verbose=False)
    deadline = time.time() + 60

    def progress(job):
        status = job.status()
        return status.progress_data[0] if status.progress_data else None

    generating = generate_request(long_one, 0, "Bag", 8, 200, 2.0, "dpm++")
    while time.time() < deadline and not progress(generating):
        time.sleep(0.05)
    place = generate_request(waiting, 0, "Bag", 1, 4, 2.0, "dpm++")
    while time.time() < deadline and not progress(place):
        time.sleep(0.05)
    assert progress(place).desc == "in the queue: 1 ahead of you"
    assert progress(generating).desc == "denoising" and progress(generating).index < 200
    place.cancel()
    generating.cancel()
    time.sleep(1)  # the generating thread stops at its next step
    before = cpu_seconds(pid)
    time.sleep(2)
    assert cpu_seconds(pid) - before < 0.5, "a cancelled request went on generating"
    assert ask(Client(url, verbose=False), n=1)[1].startswith("1 images in ")


def test_the_servers_memory_does_not_grow_with_requests(server):
    from gradio_client import Client

    url, pid = server
    client = Client(url, verbose=False)

    def resident_mb():
        return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")) / 1024

    for seed in range(10):
        ask(client, seed=seed, steps=2, n=1)
    after_10 = resident_mb()
    for seed in range(10, 100):
        ask(client, seed=seed, steps=2, n=1)
    assert resident_mb() < 1.1 * after_10
