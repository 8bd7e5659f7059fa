"""Every command the project shows, run as written on the tiny configs: the ```bash blocks of README.md
and benchmarks/README.md, the commands in the notebooks' text (inline code that starts with ``python``,
``make`` or ``accelerate``) and the examples of ``sample.py --help``.

The documented substitutions (README.md, "Tests"):
- ``python train.py CONFIG [key=value ...]``: CONFIG becomes its stage's config with the tiny config's
  ``model`` section and its keys of ``train``, ``data``, ``prior`` and ``sample`` (the size of a run);
  the command's overrides apply, but for sizes (``SIZE_KEYS``) and ``train.output_dir``, which is a
  temporary folder. ``accelerate launch ... train.py`` does the same on 2 CPU processes;
- each ``runs/NAME`` (a quick or GPU preset's run, a checkpoint in it, its ``final/``) becomes the tiny run of
  its stage trained by the tests, in a command's arguments and in the configs it names; a checkpoint named
  by ``sample.guide_with`` becomes the tiny run's oldest;
- ``--n`` is at most 20, and steps, repeats and clients are cut to a few (``CUT``); what a command writes
  (``--out``, ``--save-array``, ``--screenshot``) goes to a temporary folder;
- ``srun CMD`` runs CMD; Slurm's ``scontrol`` is not run, but the exit code its line tests is train.py's;
  ``source .venv/bin/activate`` is the environment ``make install`` makes; ``make TARGET`` is checked with
  ``make -n``; ``sample.py RUN --web`` serves until stopped (tests/test_web.py serves it);
  ``benchmarks/book.py`` runs ``--tiny`` (tests/test_benchmarks.py runs the documented one).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sample
from ddpm.checkpoint import latest_good_checkpoint, list_checkpoints
from ddpm.config import read_yaml
from ddpm.preemption import EXIT_PREEMPTED

from .conftest import ONE_THREAD, ROOT, launch_arguments, needs_browser, run

MAX_N = 20
SIZE_KEYS = {"train.max_steps", "train.epochs", "train.batch_size", "data.limit", "prior.num_class_images",
             "train.output_dir"}
TINY_SECTION_KEYS = ("train", "data", "prior", "sample")  # and the whole model section
CUT = {"--n": MAX_N, "--n-classes": MAX_N, "--steps": 2, "--warmup": 1, "--timed-steps": 1, "--repeats": 1,
       "--clients": 2}
SIZED = {"train_speed": ("--steps", "--warmup"), "sample_speed": ("--n",), "pixel_vs_latent": ("--n", "--timed-steps"),
         "dreambooth_report": ("--n", "--n-classes")}  # a benchmark's sizes whose defaults are large
WRITES = ("--out", "--save-array", "--screenshot", "--out-dir")
CODE_SPAN = re.compile(r"`((?:python|make|accelerate) [^`]+)`")


def bash_lines(path: Path) -> list[str]:
    """The commands of a Markdown file's ```bash blocks, continued lines joined, comment lines left out."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def notebook_commands() -> list[str]:
    found = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                found += [" ".join(c.split()) for c in CODE_SPAN.findall("".join(cell["source"]))]
    return found


def help_commands() -> list[str]:
    lines = [line.strip() for line in sample.__doc__.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("python sample.py ")]


def documented_commands() -> list[str]:
    commands = (bash_lines(ROOT / "README.md") + bash_lines(ROOT / "benchmarks" / "README.md")
                + notebook_commands() + help_commands())
    return list({shlex.join(shlex.split(c, comments=True)): c for c in reversed(commands)}.values())[::-1]


def book_command_arguments(out_dir: Path) -> list[str]:
    """The arguments of benchmarks/README.md's ``book.py --tiny`` command, writing into ``out_dir``."""
    [line] = [c for c in bash_lines(ROOT / "benchmarks" / "README.md") if c.startswith("python benchmarks/book.py --")]
    words = shlex.split(line, comments=True)[2:]
    return [str(out_dir) if i and words[i - 1] == "--out-dir" else w for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def tiny_runs(trained_tiny_run, trained_tiny_autoencoder, trained_tiny_latent_run, trained_tiny_text_run,
              trained_tiny_clip, trained_tiny_locked_clip, image_runs, tiny_dreambooth_runs, trained_tiny_emoji_run
              ) -> dict:
    """A documented run's name -> the tiny run of its stage (by the name's first word)."""
    return {"ddpm": trained_tiny_run, "ddpm_emoji": trained_tiny_emoji_run, "autoencoder": trained_tiny_autoencoder,
            "latent": trained_tiny_latent_run,
            "text": trained_tiny_text_run, "clip": trained_tiny_clip, "clip_fashion_locked": trained_tiny_locked_clip,
            **image_runs,
            "dreambooth_fashion": tiny_dreambooth_runs["full"], "dreambooth_fashion_lora": tiny_dreambooth_runs["lora"]}


def tiny_run_for(value: str, tiny_runs: dict) -> str:
    """``runs/NAME[/rest]`` -> the tiny run of NAME's stage (its newest checkpoint for a checkpoint); any
    other value unchanged."""
    match = re.fullmatch(r"runs/([a-z_]+?)(_quick\w*|_tiny)?(/.*)?", value)
    if not match:
        return value
    name, rest = match[1], match[3] or ""
    tiny = tiny_runs.get(name) or tiny_runs[name.split("_")[0]]
    if rest.startswith("/checkpoints/"):
        rest = "/checkpoints/" + latest_good_checkpoint(tiny / "checkpoints").name
    return str(tiny) + rest


def substituted(args: list[str], tiny_runs: dict, out: Path) -> list[str]:
    """A command's arguments with its runs, sizes and outputs substituted."""
    done, flag = [], None
    for i, arg in enumerate(args):
        previous = args[i - 1] if i else ""
        flag = arg if arg.startswith("--") else flag
        if flag in CUT and arg.isdigit():
            arg = str(min(int(arg), CUT[flag]))
        elif previous in WRITES:
            arg = str(out / Path(arg).name)
        elif arg.startswith("configs/"):
            arg = str(tiny_config_of(arg))
        elif re.fullmatch(r"sample\.guide_with=checkpoints/step-\d+", arg):  # a checkpoint of the run: its oldest
            arg = "sample.guide_with=checkpoints/" + list_checkpoints(Path(done[0]) / "checkpoints")[0].name
        else:
            arg = tiny_run_for(arg, tiny_runs)
        done.append(arg)
    return done


def tiny_config_of(config: str) -> Path:
    """The tiny config of the config's stage whose name shares the longest start with the config's
    (clip_fashion_locked_quick -> clip_fashion_locked_tiny, clip_fashion_attributes_quick -> clip_fashion_tiny)."""
    stage, words = read_yaml(ROOT / config)["stage"], Path(config).stem.removesuffix("_quick").split("_")
    for n in range(len(words), 0, -1):
        tiny = ROOT / "configs" / ("_".join(words[:n]) + "_tiny.yaml")
        if tiny.is_file() and read_yaml(tiny)["stage"] == stage:
            return tiny
    return next(p for p in sorted((ROOT / "configs").glob("*_tiny.yaml")) if read_yaml(p)["stage"] == stage)


def training_arguments(args: list[str], tiny_runs: dict, tmp_path: Path) -> list[str]:
    """``CONFIG key=value ...`` of a documented train.py command -> the same on the tiny config's sizes."""
    config, overrides = args[0], args[1:]
    raw, tiny = read_yaml(ROOT / config), read_yaml(tiny_config_of(config))
    if "model" in tiny:
        raw["model"] = copy.deepcopy(tiny["model"])
    for section in TINY_SECTION_KEYS:
        if section in tiny:
            raw.setdefault(section, {}).update(tiny[section])

    def runs_replaced(value):
        if isinstance(value, dict):
            return {k: runs_replaced(v) for k, v in value.items()}
        return tiny_run_for(value, tiny_runs) if isinstance(value, str) else value

    raw = runs_replaced(raw)
    raw["train"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / Path(config).name
    path.write_text(yaml.safe_dump(raw))
    kept = [o for o in overrides if o.split("=", 1)[0] not in SIZE_KEYS]
    return [str(path), *(f"{o.split('=', 1)[0]}={tiny_run_for(o.split('=', 1)[1], tiny_runs)}" for o in kept)]


def run_benchmark(script: str, args: list[str]) -> int:
    """A benchmark's ``main`` in this process, its sizes (``SIZED``) cut as ``CUT`` says where the command
    leaves them at their defaults."""
    name = Path(script).stem
    if name == "web_page":
        needs_browser()
    for flag in SIZED.get(name, ()):
        if flag not in args:
            args += [flag, str(CUT[flag])]
    return importlib.import_module(f"benchmarks.{name}").main(args)


@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: c[:80])
def test_a_documented_command_runs(command, tiny_runs, tmp_path):
    words = shlex.split(command, comments=True)
    if words[0] == "srun":
        words = words[1:]
    program = words[:2] if words[0] == "python" else words[:1]
    args = words[len(program):]
    if words[0] == "source":
        assert args == [".venv/bin/activate"] and "VENV ?= .venv" in (ROOT / "Makefile").read_text()
    elif words[0] == "[":  # [ $? -eq 75 ] && scontrol requeue ...
        assert f"-eq {EXIT_PREEMPTED} ]" in command
    elif words[0] == "make":
        done = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    elif program == ["python", "sample.py"]:
        if "--web" in args:
            pytest.skip("serves until stopped: tests/test_web.py serves the page")
        args = substituted(args, tiny_runs, tmp_path)
        if "--out" not in args:
            args += ["--out", str(tmp_path / "grid.png")]
        if ("--evaluate" in args or "--sweep" in args) and "--n" not in args:  # their default n is 1000
            args += ["--n", str(MAX_N)]
        result = run("sample.py", *args)
        assert result.returncode == 0, f"python sample.py {shlex.join(args)}\n{result.stderr[-3000:]}"
    elif program == ["python", "train.py"]:
        args = training_arguments(args, tiny_runs, tmp_path)
        result = run("train.py", *args)
        assert result.returncode == 0, f"python train.py {shlex.join(args)}\n{result.stderr[-3000:]}"
    elif words[0] == "accelerate":
        script = args.index("train.py")
        args = training_arguments(args[script + 1:], tiny_runs, tmp_path)
        done = subprocess.run([sys.executable, *launch_arguments(2), "train.py", *args], cwd=ROOT, env=ONE_THREAD,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    elif program == ["python", "-m"]:
        module, args = args[0], substituted(args[1:], tiny_runs, tmp_path)
        assert importlib.import_module(module).main(args) in (0, None)
    elif program[1] == "benchmarks/book.py":
        pytest.skip("the chain's --tiny command is run by tests/test_benchmarks.py")
    elif program[1].startswith("benchmarks/"):
        assert run_benchmark(program[1], substituted(args, tiny_runs, tmp_path)) == 0
    else:
        pytest.fail(f"no rule runs this documented command: {command}")


def test_evaluate_prints_where_its_numbers_come_from(trained_tiny_run, tmp_path):
    """--evaluate's table starts with the lines RESULTS.md keeps beside every figure."""
    result = run("sample.py", str(trained_tiny_run), "--evaluate", "--n", "10", "--steps", "2")
    assert result.returncode == 0, result.stderr
    command, date, device, versions = result.stdout.splitlines()[:4]
    assert command == f"command: `python sample.py {trained_tiny_run} --evaluate --n 10 --steps 2`  "
    assert re.fullmatch(r"date: 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d  ", date)
    assert device.startswith("device: ") and device.endswith(" threads  ")
    assert versions.startswith("versions: torch 2.") and "diffusers 0." in versions and "peft " in versions
