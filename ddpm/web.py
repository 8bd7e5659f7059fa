"""A web page to explore a trained run: ``python sample.py RUN --web`` (Gradio, ``pip install -e '.[web]'``).

The page holds the run's model in memory and makes the same call as ``sample.py``,
``stage.generate_rows`` for whatever kind of condition is asked for, with the same settings
and seed. So every result comes with the ``sample.py`` command that makes the same pixels, and
with the denoising trajectory of its first image: the noisy sample x_t beside the clean image
x0_hat the network predicts from it, every few steps.

Its controls follow what the stage declares (``stage.capabilities``), never its name: a field per
kind of condition (a list of its choices, the classes, or text, a prompt), a negative prompt for
"prompt", an upload per input image, img2img for every stage that generates. ``Explorer`` does
the work and is plain Python (tested in-process); ``build_page`` only lays Gradio components
around ``Explorer.answer``.

Many browsers at once: the model answers one request at a time, first come first served
(``Line``); at most ``max_waiting`` more wait their turn, each shown how many are ahead of it,
and any more are told at once that the page is busy. A request asks for at most
``max_image_steps`` images x steps, and an upload is at most ``max_upload_mb``. A request that
is stopped (the Stop button) or whose page is closed leaves the line, or stops generating at
its next denoising step.
"""

import contextlib
import dataclasses
import hashlib
import math
import os
import shlex
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .diffusion import samplers_for
from .errors import UserError
from .plots import rows_of, tile
from .request import check_request, read_inputs
from .run_folder import run_dir_of
from .runs import load_for_sampling

MAX_IMAGES = 64
MAX_GUIDANCE = 20.0
SNAPSHOTS = 8  # trajectory pictures per generation (plus the last step)
# Limits for a page that many may use (sample.py --web --max-waiting ... overrides them)
MAX_WAITING = 8  # requests waiting behind the one being answered; more are told the page is busy
MAX_IMAGE_STEPS = 1600  # images x denoising steps of one request: 8 images of 200 steps, 64 of 25
MAX_UPLOAD_MB = 5.0  # an img2img image is made 28 x 28: a photo is a few MB


class Busy(UserError):
    """The line is full: come back in a moment."""


class Cancelled(Exception):
    """The request was stopped, or its page closed, before its images were made."""


class Ticket:
    """One request's place in the ``Line``, and the flag that cancels it from another thread."""

    def __init__(self, session: str = ""):
        self.session = session  # the browser tab that asked (Gradio's session hash)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        """Raise ``Cancelled`` once the request has been cancelled (called between denoising steps)."""
        if self._cancelled.is_set():
            raise Cancelled


class Line:
    """Requests take turns at the model, first come first served: one is answered, at most
    ``max_waiting`` wait behind it, a request past them is refused with ``Busy``."""

    def __init__(self, max_waiting: int = MAX_WAITING):
        self.max_waiting = max_waiting
        self._tickets: list[Ticket] = []  # in order of arrival; the first one is being answered
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def turn(self, ticket: Ticket, on_wait: Callable[[int], None] | None = None):
        """Wait for ``ticket``'s turn, then hold it for the ``with`` block. ``on_wait(ahead)`` whenever
        the number of requests ahead of it changes; ``Cancelled`` if it is cancelled while waiting."""
        with self._changed:
            if len(self._tickets) > self.max_waiting:
                raise Busy(f"busy: {len(self._tickets)} requests ahead of yours, as many as this page lets wait; "
                           f"try again in a moment")
            self._tickets.append(ticket)
            try:
                said = None
                while (ahead := self._tickets.index(ticket)) > 0:
                    ticket.check()
                    if ahead != said and on_wait is not None:
                        on_wait(ahead)
                        said = ahead
                    self._changed.wait(timeout=0.25)  # also looks at the ticket's flag
                ticket.check()
            except BaseException:
                self._leave(ticket)
                raise
        try:
            yield
        finally:
            with self._changed:
                self._leave(ticket)

    def _leave(self, ticket: Ticket) -> None:
        self._tickets.remove(ticket)
        self._changed.notify_all()

    def cancel_session(self, session: str) -> None:
        """Cancel every request of a browser tab (Stop, or the tab was closed)."""
        with self._changed:
            for ticket in self._tickets:
                if ticket.session == session:
                    ticket.cancel()
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._tickets)


@dataclasses.dataclass
class Request:
    """What the page asks for. Every field is one control and one ``sample.py`` flag."""

    condition: str = "class"  # the name of one of the stage's kinds of condition: "class", "prompt", ...
    value: str = ""  # what is asked of it: a class name or index, a prompt
    negative_prompt: str = ""
    guidance: float = 3.0
    scheduler: str = "dpm++"
    steps: int = 20
    seed: int = 0
    n: int = 8
    init_image: str | None = None  # img2img: an image file, any size (made 28 x 28 grayscale)
    strength: float = 0.6
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # the stage's declared input: a file each


@dataclasses.dataclass
class Result:
    images: torch.Tensor  # uint8 n x 28 x 28, what sample.py makes for ``command``
    grid: np.ndarray  # uint8 H x W: the images tiled, 4x enlarged
    trajectory: np.ndarray  # uint8: the first image's x_t (top row) and x0_hat (bottom row) every few steps
    trajectory_steps: list[tuple[int, int]]  # (step, timestep t) of each column
    seconds: float
    command: str
    warnings: list[str]


class Explorer:
    """One run's model, loaded once, and the requests the page sends it."""

    def __init__(self, run: str | Path, device: str = "cpu", max_waiting: int = MAX_WAITING,
                 max_image_steps: int = MAX_IMAGE_STEPS, max_upload_mb: float = MAX_UPLOAD_MB):
        self.run = str(run)
        if max_waiting < 0 or max_image_steps < 1 or max_upload_mb <= 0:
            raise UserError(f"the page's limits must be positive (--max-waiting may be 0): got --max-waiting "
                            f"{max_waiting}, --max-image-steps {max_image_steps}, --max-upload-mb {max_upload_mb:g}")
        self.line = Line(max_waiting)
        self.max_image_steps, self.max_upload_mb = max_image_steps, max_upload_mb
        self.stage, self.model, self.folder = load_for_sampling(run, device)
        if not self.stage.capabilities.generates:
            raise UserError(f"{run} is a '{self.stage.name}' run, which makes no new images; the page "
                            f"explores diffusion runs (sample.py {run} shows what this one does)")
        self.inputs = self.stage.capabilities.inputs  # the images every sample starts from: one upload each
        self.marks_up_init_image = self.stage.capabilities.marks_up_init_image  # the picture is an input
        self.conditions = {kind.name: kind for kind in self.stage.capabilities.conditions}  # a field each
        self.max_steps = self.stage.diffusion.num_train_timesteps
        self.inputs_dir = run_dir_of(self.folder) / "samples" / "web"  # img2img inputs, for the commands

    def defaults(self) -> Request:
        """The run's own ``sample`` settings."""
        s = self.stage.config.sample
        kind = next(iter(self.conditions.values()))
        return Request(condition=kind.name, value=kind.choices(self.stage)[0] if kind.choices else "",
                       guidance=s.guidance, scheduler=s.scheduler, steps=s.steps, seed=s.seed)

    def check(self, r: Request) -> None:
        """Raise ``UserError`` with what to change for a request the run cannot answer."""
        if r.condition not in self.conditions:
            raise UserError(f"this run is asked for {' or '.join(self.conditions)}, not {r.condition!r}")
        if not r.value.strip():
            raise UserError(f"the {r.condition} is empty: type what to draw (or ask for a class)")
        if len(self.conditions[r.condition].rows(self.stage, r.value)) != 1:
            raise UserError(f"the page makes one {r.condition} at a time; the command makes several")
        if r.negative_prompt and "prompt" not in self.conditions:
            raise UserError("a negative prompt needs a run that takes prompts")
        check_request({"steps": self.max_steps, "n": MAX_IMAGES, "guidance": MAX_GUIDANCE}, scheduler=r.scheduler,
                      steps=r.steps, n=r.n, seed=r.seed, guidance=r.guidance, strength=r.strength)
        if r.n * r.steps > self.max_image_steps:
            raise UserError(f"{int(r.n)} images x {int(r.steps)} steps is more than this page makes for one request "
                            f"({self.max_image_steps}): ask for fewer images or steps, or use the command")
        uploads = {"the img2img image": r.init_image, **{f"the {i.flag[2:]} image": r.inputs.get(i.name)
                                                          for i in self.inputs}}
        for what, path in uploads.items():
            size_mb = os.path.getsize(path) / 2**20 if path and os.path.isfile(path) else 0
            if size_mb > self.max_upload_mb:
                raise UserError(f"{what} is {size_mb:.1f} MB, more than this page takes "
                                f"({self.max_upload_mb:g} MB): upload a smaller image")
        missing = [i.flag[2:] for i in self.inputs if not r.inputs.get(i.name)]
        if self.marks_up_init_image and not r.init_image:
            missing.insert(0, "picture (img2img's image)")
        if missing:
            raise UserError(f"this run samples from input images: upload the {' and the '.join(missing)}")

    def answer(self, r: Request, ticket: Ticket, on_wait: Callable[[int], None] | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> Result:
        """``generate`` when the request's turn comes in the line; ``Cancelled`` (between two steps)
        once its ticket is cancelled. A bad request is refused before it waits."""
        self.check(r)

        def on_step(done, total):
            ticket.check()
            if on_progress is not None:
                on_progress(done, total)

        with self.line.turn(ticket, on_wait):
            return self.generate(r, on_progress=on_step)

    def generate(self, r: Request, on_progress: Callable[[int, int], None] | None = None) -> Result:
        """The images, their grid, the trajectory, the time and the ``sample.py`` command of a request.
        ``on_progress(done, total)`` after every denoising step."""
        self.check(r)
        r = dataclasses.replace(r, steps=int(r.steps), n=int(r.n), seed=int(r.seed), guidance=float(r.guidance))
        settings = dict(scheduler=r.scheduler, steps=r.steps, guidance=r.guidance, seed=r.seed,
                        negative_prompt=r.negative_prompt)
        kept = {item: self.keep_file(r.inputs[item.name]) for item in self.inputs}
        inputs, init = read_inputs(r.init_image, {item.name: str(path) for item, path in kept.items()}, self.inputs)
        init_path = self.keep_input(inputs.get("image", init)) if r.init_image else None
        if init is not None:
            settings.update(init_images=init.expand(r.n, -1, -1), strength=r.strength)
        if self.inputs:
            settings["inputs"] = inputs
        columns, steps_shown = [], []
        every = max(1, math.ceil(r.steps / SNAPSHOTS))

        def on_step(i, n, t, x_t, x0_hat):
            if i % every == 0 or i == n - 1:
                shown = self.stage.space.to_images
                columns.append(torch.cat([shown(x_t[:1]), shown(x0_hat[:1])]))
                steps_shown.append((i + 1, int(t)))
            if on_progress is not None:
                on_progress(i + 1, n)

        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = self.conditions[r.condition].rows(self.stage, r.value) * r.n
            images = self.stage.generate_rows(self.model, r.condition, rows, on_step=on_step, **settings)
        seconds = time.perf_counter() - start
        grid, _ = rows_of(images, [""], r.n)
        said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        return Result(images, tile(grid), tile(torch.stack(columns, dim=1)), steps_shown, seconds,
                      self.command(r, init_path, {item.flag: path for item, path in kept.items()}), said)

    def keep_input(self, image: torch.Tensor) -> Path:
        """Save an img2img input (uint8 1 x 28 x 28) as a PNG in the run, named by its pixels, so the
        command can name it and read back exactly these pixels (PNG is lossless)."""
        from PIL import Image

        pixels = image[0].numpy()
        path = self.inputs_dir / f"init-{hashlib.sha1(pixels.tobytes()).hexdigest()[:12]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        return path

    def keep_file(self, path: str) -> Path:
        """Copy an uploaded input into the run, named by its bytes, so that the command reads the same file."""
        data = Path(path).read_bytes()
        kept = self.inputs_dir / f"input-{hashlib.sha1(data).hexdigest()[:12]}{Path(path).suffix or '.png'}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(data)
        return kept

    def command(self, r: Request, init_path: Path | None = None, inputs: dict[str, Path] | None = None) -> str:
        """The ``sample.py`` command that makes the same images as the request."""
        args = ["python", "sample.py", self.run]
        args += [f"--{r.condition}", *self.conditions[r.condition].rows(self.stage, r.value)]
        if r.negative_prompt:
            args += ["--negative-prompt", r.negative_prompt]
        args += ["--n", str(r.n), "--scheduler", r.scheduler, "--steps", str(r.steps),
                 "--guidance", repr(float(r.guidance)), "--seed", str(r.seed)]
        if init_path is not None:
            args += ["--init-image", str(init_path)]
            if not self.marks_up_init_image:
                args += ["--strength", repr(float(r.strength))]
        for flag, path in (inputs or {}).items():
            args += [flag, str(path)]
        return shlex.join(args)


def build_page(explorer: Explorer):
    """The Gradio page: controls on the left, the grid, the trajectory and the command on the right."""
    gr = import_gradio()
    import anyio  # Gradio's own async library

    d = explorer.defaults()
    asks_prompts = "prompt" in explorer.conditions
    with gr.Blocks(title=f"sdsteps: {explorer.run}") as page:
        gr.Markdown(f"## {explorer.run}\nA '{explorer.stage.name}' run, weights from `{explorer.folder}`.")
        with gr.Row():
            with gr.Column(scale=1):
                condition = gr.Radio(list(explorer.conditions), value=d.condition, label="Ask for",
                                     visible=len(explorer.conditions) > 1)
                values = [gr.Dropdown(list(kind.choices(explorer.stage)), value=d.value, label=name.capitalize(),
                                      elem_id=name) if kind.choices else
                          gr.Textbox(label=name.capitalize(), elem_id=name)
                          for name, kind in explorer.conditions.items()]
                negative = gr.Textbox(label="Negative prompt", visible=asks_prompts)
                guidance = gr.Slider(0, MAX_GUIDANCE, value=d.guidance, step=0.5, label="Guidance w",
                                     elem_id="guidance")
                scheduler = gr.Dropdown(samplers_for(explorer.stage.diffusion.objective), value=d.scheduler,
                                        label="Scheduler")
                steps = gr.Number(d.steps, precision=0, label=f"Steps (1-{explorer.max_steps})", elem_id="steps")
                seed = gr.Number(d.seed, precision=0, label="Seed")
                n = gr.Slider(1, MAX_IMAGES, value=d.n, step=1, label="Images")
                uploads = [gr.Image(type="filepath", sources=["upload"], label=f"{i.flag[2:]}: {i.help}",
                                    elem_id=f"input-{i.name}") for i in explorer.inputs]
                marks_up = explorer.marks_up_init_image
                with gr.Accordion("picture" if marks_up else "img2img", open=marks_up):
                    init_image = gr.Image(type="filepath", sources=["upload"], elem_id="init-image",
                                          label="The picture the input above marks up" if marks_up
                                          else "Start from this image")
                    strength = gr.Slider(0, 1, value=d.strength, step=0.05, label="Strength (1 ignores the image)",
                                         visible=not marks_up)
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=2):
                grid = gr.Image(show_label=False, format="png", image_mode="L", interactive=False, elem_id="grid")
                timing = gr.Markdown(elem_id="timing")
                command = gr.Code(label="The same images from the command line", language="shell",
                                  interactive=False, wrap_lines=True, lines=2, max_lines=4, elem_id="command")
                trajectory = gr.Image(show_label=False, format="png", image_mode="L", interactive=False,
                                      elem_id="trajectory")
                trajectory_steps = gr.Markdown(elem_id="trajectory-steps")

        def answer(request: Request, ticket: Ticket, progress) -> Result | None:
            """``explorer.answer`` in a worker thread; None if it was stopped."""
            try:
                return explorer.answer(
                    request, ticket, on_wait=lambda ahead: progress(0, desc=f"in the queue: {ahead} ahead of you"),
                    on_progress=lambda i, total: progress((i, total), desc="denoising"))
            except UserError as e:
                raise gr.Error(str(e), print_exception=False) from None
            except Cancelled:
                return None
            except Exception as e:  # the page shows a line; the server's console keeps the traceback
                traceback.print_exc()
                raise gr.Error(f"{type(e).__name__}: {e}", print_exception=False) from None

        async def generate(request: gr.Request, progress=gr.Progress(), condition=None, *fields):
            """Gradio runs as many of these at once as ask (the line orders them): each waits for its turn
            and generates in a worker thread. A client that cancels (Gradio's client) cancels this
            coroutine; the thread is left to stop at its next step, and leaves the line. (Gradio puts the
            request and the progress where the signature has them: first, before a field per kind of
            condition, the other controls and the uploads.)"""
            asked = dict(zip(explorer.conditions, fields))
            controls, input_files = fields[len(asked) : len(asked) + 8], fields[len(asked) + 8 :]
            files = {i.name: f for i, f in zip(explorer.inputs, input_files) if f}
            r = Request(condition, asked.get(condition) or "", *controls, files)
            ticket = Ticket(request.session_hash)
            try:
                result = await anyio.to_thread.run_sync(answer, r, ticket, progress, abandon_on_cancel=True)
            finally:
                ticket.cancel()  # nothing to stop once the answer is made
            if result is None:  # stopped: the last images stay
                return gr.skip(), "stopped", gr.skip(), gr.skip(), gr.skip()
            for message in result.warnings:
                gr.Warning(message)
            shown = ", ".join(f"{i} (t = {t})" for i, t in result.trajectory_steps)
            return (result.grid, f"{len(result.images)} images in {result.seconds:.2f} s", result.command,
                    result.trajectory, f"Denoising the first image: x_t (top) and the clean image predicted "
                                       f"from it (bottom) after steps {shown} of {result.trajectory_steps[-1][0]}")

        def stop_tab(request: gr.Request):
            """Stop, or the tab was closed: its request leaves the line, or stops at its next step."""
            explorer.line.cancel_session(request.session_hash)

        inputs = [condition, *values, negative, guidance, scheduler, steps, seed, n, init_image, strength, *uploads]
        button.click(generate, inputs, [grid, timing, command, trajectory, trajectory_steps], api_name="generate",
                     concurrency_limit=None, show_progress_on=grid)  # explorer.line orders and bounds them
        stop.click(stop_tab, queue=False)
        page.unload(stop_tab)
    return page


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio
    except ImportError:
        raise UserError("the web page needs Gradio: pip install -e '.[web]'") from None
    return gradio


def serve(run: str | Path, device: str = "cpu", host: str = "127.0.0.1", port: int = 7860, **limits) -> None:
    """``sample.py RUN --web``: serve the page for ``run`` at http://host:port until interrupted;
    ``limits``: ``Explorer``'s ``max_waiting``, ``max_image_steps``, ``max_upload_mb``."""
    import_gradio()  # before loading the model: say at once that Gradio is missing
    launch(Explorer(run, device, **limits), host, port, block=True)


def launch(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, block: bool = False):
    """Serve ``explorer``'s page; returns the Gradio app (``block=False``: at once; ``close()`` stops it)."""
    page = build_page(explorer)
    page.queue(max_size=None)  # every request reaches explorer.line, which orders and bounds them
    try:
        page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False,
                    inbrowser=False, show_error=False, quiet=not block,
                    max_file_size=f"{explorer.max_upload_mb:g}mb")
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port} ({e.strerror or 'in use'}): choose another --port") from None
    return page
