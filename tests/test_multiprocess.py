"""Scale-out: two CPU processes under ``accelerate launch`` train the same model as one.

Every random draw is made for the global batch from a (seed, step) generator and each
process trains on its slice, so 1 process, 2 processes and 2 accumulation steps see the same
examples, timesteps and noise; only the order of floating-point sums differs.
"""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import train
from ddpm.plots import read_metrics

from .conftest import ROOT, TINY, tiny_config

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 sums in another order, over 8 steps


def final_weights(run):
    return load_file(run / "checkpoints" / "step-00000008" / "model.safetensors")


def assert_same_training(a, b):
    la = [r["loss"] for r in read_metrics(a / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(b / "metrics.jsonl")]
    assert len(la) == len(lb) == 8, "one metrics line per step: only the main process writes"
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), **TOLERANCE)
    wa, wb = final_weights(a), final_weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **TOLERANCE)


def test_two_processes_match_one(tmp_path, trained_tiny_run):
    out = tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "train.py", str(TINY), f"train.output_dir={out}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr + result.stdout
    assert_same_training(trained_tiny_run, out)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["final.png"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, trained_tiny_run):
    accumulated = train.train(tiny_config(tmp_path / "accum", train={"grad_accum_steps": 4}))
    assert_same_training(trained_tiny_run, accumulated)
