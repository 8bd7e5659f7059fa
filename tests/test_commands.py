"""The commands the README shows, run as written on the tiny runs: every ``python sample.py`` line of
README.md and of sample.py's help (``--web`` apart: it serves until stopped; tests/test_web.py serves it).

The documented substitution: each ``runs/NAME`` (a quick preset's run, a checkpoint in it, its
``final/``) becomes the tiny run of the same stage trained by the tests; ``--n`` is at most 20; what a
command writes (``--out``, ``--save-array``) goes to a temporary folder.
"""

import re
import shlex
from pathlib import Path

import pytest

import sample
from ddpm.checkpoint import latest_good_checkpoint

from .conftest import ROOT, run

MAX_N = 20


def documented_commands() -> list[str]:
    """The arguments of every ``python sample.py`` line of README.md's ```bash blocks and of sample.py's
    help (continued lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S) + [sample.__doc__]
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line.removeprefix("python sample.py") for line in lines if line.startswith("python sample.py ")]
    return list(dict.fromkeys(c for c in commands if "--web" not in shlex.split(c, comments=True)))


@pytest.fixture(scope="module")
def tiny_runs(trained_tiny_run, trained_tiny_autoencoder, trained_tiny_latent_run, trained_tiny_text_run,
              trained_tiny_clip, image_runs, tiny_dreambooth_runs) -> dict:
    """A documented run's name -> the tiny run of its stage (by the name's first word)."""
    return {"ddpm": trained_tiny_run, "autoencoder": trained_tiny_autoencoder, "latent": trained_tiny_latent_run,
            "text": trained_tiny_text_run, "clip": trained_tiny_clip, **image_runs,
            "dreambooth_fashion": tiny_dreambooth_runs["full"], "dreambooth_fashion_lora": tiny_dreambooth_runs["lora"]}


def substituted(args: list[str], tiny_runs: dict, out: Path) -> list[str]:
    done = []
    for i, arg in enumerate(args):
        previous = args[i - 1] if i else ""
        if match := re.fullmatch(r"runs/([a-z_]+?)(_quick\w*)?(/.*)?", arg):
            name, rest = match[1], match[3] or ""
            tiny = tiny_runs.get(name) or tiny_runs[name.split("_")[0]]
            if rest.startswith("/checkpoints/"):
                rest = "/checkpoints/" + latest_good_checkpoint(tiny / "checkpoints").name
            arg = str(tiny) + rest
        elif previous == "--n":
            arg = str(min(int(arg), MAX_N))
        elif previous in ("--out", "--save-array"):
            arg = str(out / Path(arg).name)
        done.append(arg)
    return done


@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: c.strip()[:80])
def test_a_documented_sample_command_runs(command, tiny_runs, tmp_path):
    args = substituted(shlex.split(command, comments=True), tiny_runs, tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "grid.png")]
    if ("--evaluate" in args or "--sweep" in args) and "--n" not in args:  # their default n is 1000
        args += ["--n", str(MAX_N)]
    result = run("sample.py", *args)
    assert result.returncode == 0, f"python sample.py {shlex.join(args)}\n{result.stderr[-3000:]}"
