"""How fast the web page answers, measured in a real browser, and the README's screenshot.

    python benchmarks/web_page.py runs/ddpm_fashion_quick                # 8 images, 20 steps
    python benchmarks/web_page.py runs/ddpm_fashion_quick --screenshot benchmarks/web_page.png

Serves ``sample.py RUN --web``'s page on a free port, opens it in headless Chromium (Debian's
``chromium``, driven by Playwright: ``pip install -e '.[web,dev]'``, ``apt-get install chromium``),
asks for one class at the run's scheduler and guidance, clicks Generate and times the click
until the grid's image has arrived in the browser: what a user waits. The first answer is a
warm-up (not counted); then ``--repeats`` answers give the median, beside the time the
generation itself took (the page's own figure). Prints Markdown, for benchmarks/RESULTS.md.

The browser helpers (``chromium``, ``PageDriver``) are also what ``tests/test_web.py`` drives.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `ddpm` imports when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpm.errors import UserError, cli_errors  # noqa: E402
from ddpm.web import Explorer, launch  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# headless, and quiet on a machine without a network: no background connections at all
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(explorer: Explorer):
    """The page for ``explorer`` on a free local port, for the ``with`` block: yields its URL."""
    port = free_port()
    page = launch(explorer, port=port)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


@contextlib.contextmanager
def chromium():
    """A headless Chromium (Playwright driving Debian's browser, never one it downloads)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UserError("the browser tests need Playwright: pip install -e '.[web,dev]'") from None
    if not Path(CHROMIUM).is_file():
        raise UserError(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM to its path)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class PageDriver:
    """Clicks and reads one open page as a user would, by the labels the user sees."""

    def __init__(self, page, url: str):
        self.page = page
        page.goto(url)
        page.get_by_role("button", name="Generate").wait_for()

    def choose_class(self, name: str) -> None:
        box = self.page.get_by_label("Class", exact=True)
        box.click()
        box.fill(name)
        self.page.get_by_role("option", name=name, exact=True).click()

    def set_number(self, label: str, value: float) -> None:
        """A number field, or a slider's number box (its label: "number input for <slider label>")."""
        box = self.page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
        box.blur()

    def generate(self, timeout_s: float = 60) -> tuple[np.ndarray, float]:
        """Click Generate; wait for a new grid image. Returns its pixels (uint8 H x W) and the
        seconds from the click to the image's arrival in the browser."""
        grid = self.page.locator("#grid img")
        before = grid.get_attribute("src") if grid.count() else None
        start = time.perf_counter()
        self.page.get_by_role("button", name="Generate").click()
        self.page.wait_for_function(
            """before => { const img = document.querySelector('#grid img');
                           return img && img.src !== before && img.complete && img.naturalWidth > 0; }""",
            arg=before, timeout=timeout_s * 1000)
        seconds = time.perf_counter() - start
        return self.image_pixels(grid.get_attribute("src")), seconds

    def image_pixels(self, src: str) -> np.ndarray:
        from PIL import Image

        body = self.page.request.get(src).body()
        return np.asarray(Image.open(io.BytesIO(body)).convert("L"))

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--class", dest="class_name", default="Ankle boot")
    parser.add_argument("--n", type=int, default=8, help="images per answer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshot", default=None, metavar="PNG", help="save the page after the last answer")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    explorer = Explorer(args.run)
    with served(explorer) as url, chromium() as browser:
        browser_version = browser.version
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        driver = PageDriver(page, url)
        driver.choose_class(args.class_name)
        driver.set_number("number input for Images", args.n)
        driver.set_number(f"Steps (1-{explorer.max_steps})", args.steps)
        answers, generations = [], []
        for seed in range(args.repeats + 1):
            driver.set_number("Seed", seed)
            _, seconds = driver.generate()
            answers.append(seconds)
            generations.append(float(driver.text("#timing").split(" in ")[1].split(" s")[0]))
        if args.screenshot:
            page.wait_for_timeout(1000)  # the page's fade-in after an answer
            page.screenshot(path=args.screenshot, full_page=True)
    import gradio

    s = explorer.stage.config.sample
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"### The web page: `python benchmarks/web_page.py {command}`\n")
    print(f"{datetime.date.today()}, {platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, gradio {gradio.__version__}, headless Chromium {browser_version}\n")
    print(f"{args.n} images of class {args.class_name!r} per answer, {s.scheduler} {args.steps} steps, guidance "
          f"{s.guidance:g}; median of {args.repeats} answers (seeds 1..{args.repeats}) after a warm-up\n")
    print("| click to image in the browser | generation alone (the page's figure) |")
    print("|---|---|")
    print(f"| {statistics.median(answers[1:]):.2f} s | {statistics.median(generations[1:]):.2f} s |")
    if args.screenshot:
        print(f"\nwrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
