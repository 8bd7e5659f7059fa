"""Where a measurement comes from: the command, the date, the device and the package versions.

``sample.py --evaluate`` / ``--sweep`` and every script in ``benchmarks/`` print these lines above their
tables, so that a table pasted into ``benchmarks/RESULTS.md`` carries them.
"""

from __future__ import annotations

import datetime
import platform
import shlex
from importlib import metadata

import torch

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft")


def device_name(device: str | torch.device | None = None) -> str:
    """The GPU's name, or the CPU's model and the torch threads: "AMD EPYC 7B13 CPU, 2 threads"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()} CPU"


def versions(*extra: str) -> str:
    """"torch 2.14.1, diffusers 0.42.1, ..." for PACKAGES and ``extra`` (the installed distributions)."""
    found = []
    for name in (*PACKAGES, *extra):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def provenance(argv: list[str], device: str | torch.device | None = None, extra: tuple[str, ...] = ()) -> str:
    """Four Markdown lines (each ending in two spaces, a line break): the command ``argv`` as typed
    (``["python", "sample.py", ...]``), today's date and time, the device and the versions."""
    return "\n".join([
        f"command: `{shlex.join(argv)}`  ",
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"device: {device_name(device)}  ",
        f"versions: {versions(*extra)}  ",
    ])
