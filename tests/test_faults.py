"""Fault injection: kill -9 mid-run and mid-save; stop signals (preemption) mid-run and mid-save, in one
process and in two; a loss that turns NaN; running out of GPU memory."""

import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from ddpm.checkpoint import latest_good_checkpoint, list_checkpoints, save_checkpoint, verify_checkpoint
from ddpm.errors import UserError
from ddpm.plots import read_metrics
from ddpm.stage import ClassConditionedDDPM

from ddpm.preemption import EXIT_PREEMPTED

from .conftest import ONE_THREAD, ROOT, TINY, checkpoint_weights, launch_arguments, losses, tiny_config

SIXTEEN_STEPS = ["train.max_steps=16", "train.checkpoint_every=4", "train.keep_last=5"]


def start_training(out, *launcher: str) -> subprocess.Popen:
    """The tiny config for 16 steps in a new process (``launcher``: e.g. ``accelerate launch`` arguments)
    with one thread each: the straight run below uses the same, since another thread count sums floats
    in another order."""
    return subprocess.Popen([sys.executable, *(launcher or ["train.py"]), str(TINY), f"train.output_dir={out}",
                             *SIXTEEN_STEPS], cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_steps(run, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < n and proc.poll() is None:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, fashion_mnist):
    """The tiny config trained for 16 steps without interruption, in a process like the interrupted ones."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = start_training(out)
    assert proc.wait() == 0, proc.stderr.read()
    return out


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, straight):
    killed = tmp_path / "killed"
    proc = start_training(killed)
    wait_for_steps(killed, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= len(read_metrics(killed / "metrics.jsonl")) < 16, "the kill must land mid-run"
    resumed_from = latest_good_checkpoint(killed / "checkpoints")
    assert resumed_from is not None and resumed_from.name in ("step-00000004", "step-00000008", "step-00000012")

    subprocess.run([sys.executable, "train.py", str(TINY), f"train.output_dir={killed}", *SIXTEEN_STEPS,
                    "train.resume=latest"], cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True)
    assert losses(killed) == losses(straight), "the metrics of the killed-and-resumed run differ from a straight run"


def resume_as_told(stderr: str) -> tuple[int, str]:
    """Run the resume command that the stop line gives; returns the step it stopped after, and that line."""
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("stopped by SIG") and " train.py " in line, stderr[-2000:]
    step = int(line.split(" after step ")[1].split(" ")[0])
    command = line.split("; continue with ")[1].split()
    launcher = []
    if command[0] == "accelerate":
        launcher = launch_arguments(int(command[command.index("--num_processes") + 1]))
    subprocess.run([sys.executable, *launcher, *command[command.index("train.py"):]], cwd=ROOT, env=ONE_THREAD,
                   check=True, capture_output=True)
    return step, line


def assert_ends_like(run, straight) -> None:
    assert losses(run) == losses(straight), "the metrics of the stopped-and-resumed run differ from a straight run"
    last = "checkpoints/step-00000016"
    a, b = checkpoint_weights(run / last), checkpoint_weights(straight / last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_mid_run_saves_that_step_and_resumes_exactly(tmp_path, straight, signum):
    stopped = tmp_path / "stopped"
    proc = start_training(stopped)
    wait_for_steps(stopped, 5, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    step, line = resume_as_told(stderr)
    assert 5 <= step < 16 and line.startswith(f"stopped by {signum.name} after step {step} of 16: checkpoint ")
    assert (stopped / "checkpoints" / f"step-{step:08d}").is_dir()
    assert len(read_metrics(stopped / "metrics.jsonl")) == 16
    assert_ends_like(stopped, straight)


SIGNAL_WHILE_SAVING = """
import os, signal, sys
import train
write = train._write_checkpoint
def signalled_mid_save(folder, *args):
    write(folder, *args)  # the files are written; the manifest and the rename are still to come
    os.kill(os.getpid(), signal.SIGTERM)
train._write_checkpoint = signalled_mid_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_stop_signals_while_saving_neither_cut_the_checkpoint_short_nor_lose_the_run(tmp_path, straight):
    """A SIGTERM lands in every save: in the step-4 checkpoint (the job then stops after step 5), and in
    the step-5 checkpoint that stopping writes (a second signal, only acknowledged)."""
    stopped = tmp_path / "stopped"
    proc = start_training(stopped, "-c", SIGNAL_WHILE_SAVING)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert "SIGTERM: already stopping (SIGTERM); the checkpoint is being written" in stderr
    assert [p.name for p in list_checkpoints(stopped / "checkpoints")] == ["step-00000004", "step-00000005"]
    for folder in list_checkpoints(stopped / "checkpoints"):
        verify_checkpoint(folder)
    step, _ = resume_as_told(stderr)
    assert step == 5
    assert_ends_like(stopped, straight)


def test_sigterm_to_accelerate_launch_stops_both_processes_after_one_step(tmp_path, straight):
    """The launcher passes SIGTERM on to its processes: both finish the same step, the main one saves,
    both leave; resumed with two processes, the run ends as one process trains it, to rounding."""
    stopped = tmp_path / "stopped"
    proc = start_training(stopped, *launch_arguments(2), "train.py")
    wait_for_steps(stopped, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert stderr.count("SIGTERM: stopping after this step") == 2, stderr[-3000:]
    assert stderr.count("stopped by SIGTERM after step") == 1, "one line, from the main process"
    step, line = resume_as_told(stderr[:stderr.index("\n", stderr.index("stopped by SIGTERM"))])
    assert 5 <= step < 16 and "continue with accelerate launch --num_processes 2 train.py" in line
    from .conftest import assert_same_training

    assert_same_training(straight, stopped)


KILL_WHILE_SAVING = """
import os, signal, sys
from pathlib import Path
from ddpm.checkpoint import save_checkpoint
root = Path(sys.argv[1])
def good(folder):
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
def dies_half_way(folder):
    (folder / "model.safetensors").write_bytes(b"y" * 500)
    os.kill(os.getpid(), signal.SIGKILL)
save_checkpoint(root, 1, good, keep_last=1)
save_checkpoint(root, 2, dies_half_way, keep_last=1)
"""


def test_kill_9_while_saving_keeps_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    result = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(root)], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    assert (root / ".tmp-step-00000002").is_dir()  # the half-written one never got its name
    assert latest_good_checkpoint(root) == root / "step-00000001"
    assert (root / "step-00000001" / "model.safetensors").read_bytes() == b"x" * 1000
    # the next save replaces the debris and keep_last prunes only after it is complete
    save_checkpoint(root, 2, lambda f: (f / "model.safetensors").write_bytes(b"z"), keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, fashion_mnist, monkeypatch):
    calls = {"n": 0}
    real_loss = ClassConditionedDDPM.loss

    def loss_turning_nan(self, model, batch):
        calls["n"] += 1
        loss = real_loss(self, model, batch)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(ClassConditionedDDPM, "loss", loss_turning_nan)
    run = tmp_path / "nan"
    with pytest.raises(UserError, match="loss became nan at step 6") as e:
        train.train(tiny_config(run, train={"grad_clip": None}))
    assert "resume=latest" in str(e.value)
    kept = list_checkpoints(run / "checkpoints")
    assert [p.name for p in kept] == ["step-00000004"]
    from safetensors.torch import load_file

    weights = load_file(kept[0] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_gpu_memory_says_which_keys_shrink_the_batch(tmp_path, fashion_mnist, monkeypatch):
    calls = {"n": 0}
    real_loss = ClassConditionedDDPM.loss

    def loss_out_of_memory(self, model, batch):
        calls["n"] += 1
        if calls["n"] > 10:  # in step 6, two micro-batches a step
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, model, batch)

    monkeypatch.setattr(ClassConditionedDDPM, "loss", loss_out_of_memory)
    run = tmp_path / "oom"
    with pytest.raises(UserError, match=r"out of GPU memory with train.batch_size=16 \(micro-batches of 8 on each "
                                        r"of 1 process\(es\)\); lower train.batch_size or raise "
                                        r"train.grad_accum_steps \(now 2\)"):
        train.train(tiny_config(run, train={"grad_accum_steps": 2}))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004"]
    verify_checkpoint(run / "checkpoints" / "step-00000004")
