"""Fault injection: kill -9 mid-run and mid-save, and a loss that turns NaN."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from ddpm.checkpoint import latest_good_checkpoint, list_checkpoints, save_checkpoint
from ddpm.errors import UserError
from ddpm.plots import read_metrics
from ddpm.stage import ClassConditionedDDPM

from .conftest import ROOT, TINY, tiny_config

SIXTEEN_STEPS = ["train.max_steps=16", "train.checkpoint_every=4", "train.keep_last=5"]


def test_kill_9_mid_run_then_resume_matches_uninterrupted(tmp_path, fashion_mnist):
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", str(TINY), f"train.output_dir={killed}", *SIXTEEN_STEPS],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(killed / "metrics.jsonl")) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= len(read_metrics(killed / "metrics.jsonl")) < 16, "the kill must land mid-run"
    resumed_from = latest_good_checkpoint(killed / "checkpoints")
    assert resumed_from is not None and resumed_from.name in ("step-00000004", "step-00000008", "step-00000012")

    # Same environment as the killed run: a different thread count sums floats in another order.
    straight = tmp_path / "straight"
    for out, extra in ((killed, ["train.resume=latest"]), (straight, [])):
        subprocess.run([sys.executable, "train.py", str(TINY), f"train.output_dir={out}", *SIXTEEN_STEPS, *extra],
                       cwd=ROOT, env=env, check=True, capture_output=True)
    losses = [[r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (killed, straight)]
    assert losses[0] == losses[1], "the metrics of the killed-and-resumed run differ from a straight run"


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
