"""How fast the web page answers, measured in a real browser, and the README's screenshot; and how
it answers many clients at once.

    python benchmarks/web_page.py runs/ddpm_fashion_quick                # 8 images, 20 steps
    python benchmarks/web_page.py runs/ddpm_fashion_quick --screenshot benchmarks/web_page.png
    python benchmarks/web_page.py runs/ddpm_fashion_quick --clients 1 4 16   # concurrent clients

Serves ``sample.py RUN --web``'s page on a free port, opens it in headless Chromium (Debian's
``chromium``, driven by Playwright: ``pip install -e '.[web,dev]'``, ``apt-get install chromium``),
asks for one class at the run's scheduler and guidance, clicks Generate and times the click
until the grid's image has arrived in the browser: what a user waits. The first answer is a
warm-up (not counted); then ``--repeats`` answers give the median, beside the time the
generation itself took (the page's own figure). Prints Markdown, for benchmarks/RESULTS.md.

With ``--clients``: ``sample.py RUN --web`` is served by its own process (as a user runs it), and
for each number of clients, that many Gradio clients (``gradio_client``, the page's API) each send
``--repeats`` requests one after another, all starting at once, every request its own seed. A
request is answered, or told at once that the page is busy (the line holds one generation and
``--max-waiting`` more); the table gives the median and 95th percentile of the time from sending a
request to having its grid, over the answered ones, and the images made per second in all.

The browser helpers (``chromium``, ``PageDriver``) and the served command (``serving``) are also
what ``tests/test_web.py`` drives.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `ddpm` imports when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpm.errors import UserError, cli_errors  # noqa: E402
from ddpm.provenance import provenance  # noqa: E402
from ddpm.web import MAX_WAITING, Explorer, launch  # noqa: E402

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
def serving(run, *flags: str, threads: int | None = None):
    """``sample.py RUN --web`` on a free local port in a process of its own, for the ``with`` block:
    yields (its URL, its process). ``threads``: its torch threads (default: as many as this process has)."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "sample.py", str(run), "--web", "--port", str(port), *flags], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        if proc.poll() is not None or time.time() >= deadline:
            raise UserError(f"sample.py {run} --web did not serve: {proc.stderr.read()[-2000:] if proc.poll() else ''}")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def generate_request(client, seed: int, class_name: str, n: int, steps: int, guidance: float, scheduler: str,
                     init_image=None, **submit):
    """The page's Generate through Gradio's client: ``client.submit(...)`` returns the job (its result:
    grid PNG path, timing line, command, trajectory PNG, trajectory caption)."""
    return client.submit("class", class_name, "", guidance, scheduler, steps, seed, n, init_image, 0.6,
                         api_name="/generate", **submit)


def concurrent_clients(url: str, clients: int, repeats: int, **request) -> dict:
    """``clients`` Gradio clients, each sending ``repeats`` requests in turn, all starting together:
    seconds per answered request, how many were answered and told busy, and the wall time."""
    from gradio_client import Client

    connected = [Client(url, verbose=False) for _ in range(clients)]
    seconds, busy, start = [], [], threading.Barrier(clients)

    def one_client(i):
        start.wait()
        for r in range(repeats):
            began = time.perf_counter()
            try:
                generate_request(connected[i], seed=i * repeats + r, **request).result()
                seconds.append(time.perf_counter() - began)
            except Exception as e:  # the page's one line: busy, or what went wrong
                if not str(e).startswith("busy: "):
                    raise
                busy.append(i)

    began = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"seconds": seconds, "busy": len(busy), "wall": time.perf_counter() - began}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


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
    parser.add_argument("--clients", type=int, nargs="+", default=None, metavar="C",
                        help="instead of the browser: C Gradio clients at once, for each C given")
    parser.add_argument("--max-waiting", type=int, default=MAX_WAITING, help="--clients: the served page's line")
    return parser.parse_args(argv)


def measured(command: str) -> str:
    """The provenance lines of this script's tables, for its arguments ``command``."""
    return provenance(["python", "benchmarks/web_page.py", *shlex.split(command)], extra=("gradio",))


def main_clients(args, command: str) -> int:

    explorer = Explorer(args.run)  # its sampling settings, and a check that the run is there
    s = explorer.stage.config.sample
    request = dict(class_name=args.class_name, n=args.n, steps=args.steps, guidance=s.guidance, scheduler=s.scheduler)
    rows = []
    with serving(args.run, "--max-waiting", str(args.max_waiting)) as (url, _):
        concurrent_clients(url, 1, 1, **request)  # warm-up
        for clients in args.clients:
            print(f"{clients} client(s)...", file=sys.stderr)
            rows.append((clients, concurrent_clients(url, clients, args.repeats, **request)))
    print(f"### The web page under load\n\n{measured(command)}")
    print("The server in a process of its own with the threads above, the clients in one more process.\n")
    print(f"Each client sends {args.repeats} requests in turn (all clients starting at once): {args.n} images of "
          f"class {args.class_name!r}, {s.scheduler} {args.steps} steps, guidance {s.guidance:g}. The page answers one "
          f"at a time and lets {args.max_waiting} more wait; past them a request is told at once that it is busy. "
          f"Times: from sending a request to having its grid, answered requests only.\n")
    print("| clients | requests | answered | busy | p50 time to image | p95 time to image | images/s in all |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients, r in rows:
        answered = len(r["seconds"])
        print(f"| {clients} | {clients * args.repeats} | {answered} | {r['busy']} | "
              f"{percentile(r['seconds'], 50):.2f} s | {percentile(r['seconds'], 95):.2f} s | "
              f"{answered * args.n / r['wall']:.1f} |")
    return 0


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    if args.clients:
        return main_clients(args, command)
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

    s = explorer.stage.config.sample
    print(f"### The web page\n\n{measured(command)}")
    print(f"browser: headless Chromium {browser_version}\n")
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
