"""Preemption: a stop signal ends training after the current step, with a checkpoint.

Spot instances, Slurm, Colab and Ctrl-C ask a job to stop before they kill it: SIGTERM (spot
instances, Slurm at the time limit, ``docker stop``), SIGUSR1 (Slurm's ``--signal=USR1@120``,
two minutes before the limit), SIGINT (Ctrl-C). While the training loop runs, ``StopSignals``
turns each of them into a request that ``train.py`` reads after every optimizer step: it then
writes a checkpoint of that step (atomically, as always), raises ``Preempted`` and the command
exits with ``EXIT_PREEMPTED``. ``train.resume=latest`` continues exactly, as from any checkpoint.

A second signal while the job stops is acknowledged and otherwise ignored, so nothing cuts the
checkpoint short (and a kill -9 leaves the last complete checkpoint: see ``checkpoint.py``).

Several processes (``accelerate launch``) must stop after the same step, whichever of them got
the signal: after every step they take the largest of their flags in an all-reduce on the CPU
(a gloo group beside NCCL on GPUs), which never waits for the GPU's queue of work.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

# sysexits.h's EX_TEMPFAIL, "a temporary failure: try again later": what a requeueing job script
# can test for (2 is bad input, 130 an interrupt before training started).
EXIT_PREEMPTED = 75
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; the message says how to continue."""


class StopSignals:
    """``with StopSignals(world_size) as stop:`` the stop signals set a flag instead of killing
    the process; ``stop.requested()`` after each step says whether any process got one. The
    previous handlers come back on exit (a notebook's Ctrl-C included)."""

    def __init__(self, world_size: int = 1):
        self.received: str | None = None  # the first signal's name
        self.world_size = world_size
        self._group = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if self.world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # a CPU all-reduce: no wait for the GPU
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"\n{name}: stopping after this step, with a checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"\n{name}: already stopping ({self.received}); the checkpoint is being written, wait for it",
                  file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Did this process, or any other, get a stop signal? Every process must call it after every step."""
        if self.world_size == 1:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


def ignore_stop_signals() -> None:
    """From now on the stop signals do nothing (a command that is leaving after ``Preempted``)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
