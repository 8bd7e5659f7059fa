"""Scale-out: two CPU processes under ``accelerate launch`` train the same model as one.

Every random draw is made for the global batch from a (seed, step) generator and each
process trains on its slice, so 1 process, 2 processes and 2 accumulation steps see the same
examples, timesteps and noise; only the order of floating-point sums differs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from ddpm.plots import read_metrics

from .conftest import ROOT, TINY, TINY_AUTOENCODER, tiny_config

# float32 sums in another order. Adam moves a weight by about lr at first whatever the size of
# its gradient, so where a gradient is close to 0 its rounding shows in the weight: lr is 2e-3
# in the tiny presets, and we allow a twentieth of one such step.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
ONE_THREAD = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def accelerate_launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` on the CPU with ``processes`` processes (a gloo group) of one thread each."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_processes_shard_the_data_and_stay_in_sync(tmp_path, config, *overrides: str) -> None:
    """Two processes (tests/process_probe.py records what each trained on): at every step the
    two micro-batches are disjoint and together exactly the one-process batch, the weights are
    identical in both processes, and each epoch deals the examples out afresh."""
    batch_size = train.load_config(tiny_config(tmp_path, config))[1].batch_size
    # two steps an epoch, no flips: an example's clean input is its image
    overrides = (f"data.limit={2 * batch_size}", "data.flip=false", *overrides)
    probe = ["tests/process_probe.py", str(config)]
    accelerate_launch(*probe, str(tmp_path / "two"), f"train.output_dir={tmp_path / 'two-run'}", *overrides)
    subprocess.run([sys.executable, *probe, str(tmp_path / "one"), f"train.output_dir={tmp_path / 'one-run'}",
                    *overrides], cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True, timeout=600)
    one, rank0, rank1 = (json.loads((tmp_path / d / f"rank-{r}.json").read_text())
                         for d, r in (("one", 0), ("two", 0), ("two", 1)))
    assert len(one) == len(rank0) == len(rank1) >= 4
    for step, (a, b, whole) in enumerate(zip(rank0, rank1, one)):
        assert a["weights"] == b["weights"], f"the processes' weights differ before step {step}"
        assert not set(a["examples"]) & set(b["examples"]), f"both processes trained on one example at step {step}"
        assert sorted(a["examples"] + b["examples"]) == sorted(whole["examples"]), step
    epochs = [rank0[e : e + 2] + rank1[e : e + 2] for e in range(0, len(rank0) - 1, 2)]
    for epoch in epochs:  # every example once an epoch
        assert len({i for call in epoch for i in call["inputs"]}) == 2 * batch_size
    assert rank0[0]["inputs"] != rank0[2]["inputs"], "process 0 got the same shard in epochs 0 and 1"


@pytest.mark.parametrize("config", [TINY, TINY_AUTOENCODER], ids=lambda p: p.stem)
def test_processes_shard_the_data_and_stay_in_sync(tmp_path, fashion_mnist, config):
    assert_processes_shard_the_data_and_stay_in_sync(tmp_path, config)


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
    result = accelerate_launch("train.py", str(TINY), f"train.output_dir={out}")
    assert "2 process(es)" in result.stderr + result.stdout
    assert_same_training(trained_tiny_run, out)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["final.png"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path, trained_tiny_run):
    accumulated = train.train(tiny_config(tmp_path / "accum", train={"grad_accum_steps": 4}))
    assert_same_training(trained_tiny_run, accumulated)
