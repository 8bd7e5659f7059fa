"""Scale-out: two CPU processes under ``accelerate launch`` train the same model as one.

Every random draw is made for the global batch from a (seed, step) generator and each
process trains on its slice, so 1 process, 2 processes and 2 accumulation steps see the same
examples, timesteps and noise; only the order of floating-point sums differs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from ddpm.plots import read_metrics

from .conftest import ROOT, TINY, TINY_AUTOENCODER, checkpoint_weights, tiny_config

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


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs of one config logged the same losses and ended with the same weights and EMA,
    within TOLERANCE; one metrics line per step in each (only a main process writes)."""
    la, lb = ([r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] for run in (a, b))
    steps = train.load_run(a)[1].max_steps
    assert len(la) == len(lb) == steps, "one metrics line per step: only the main process writes"
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), **TOLERANCE)
    last = f"step-{steps:08d}"
    wa, wb = (checkpoint_weights(run / "checkpoints" / last) for run in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **TOLERANCE)


def assert_two_processes_train_like_one(tmp_path: Path, config: Path, *overrides: str) -> None:
    """The same config trained by two processes and by one (tests/process_probe.py records what
    each process trained on): at every step the two micro-batches are disjoint and together
    exactly the one-process batch, and both processes hold the same weights; each epoch deals the
    examples out afresh; losses and final weights match the one-process run; only the main
    process writes grids and metrics."""
    batch_size = train.load_config(tiny_config(tmp_path, config))[1].batch_size
    # two steps an epoch, no flips: an example's clean input is its image
    overrides = (f"data.limit={2 * batch_size}", "data.flip=false", *overrides)
    probe = ["tests/process_probe.py", str(config)]
    two, one = tmp_path / "two", tmp_path / "one"
    result = accelerate_launch(*probe, str(two / "probe"), f"train.output_dir={two}", *overrides)
    assert "2 process(es)" in result.stderr + result.stdout
    subprocess.run([sys.executable, *probe, str(one / "probe"), f"train.output_dir={one}", *overrides],
                   cwd=ROOT, env=ONE_THREAD, check=True, capture_output=True, timeout=600)

    whole, rank0, rank1 = (json.loads((run / "probe" / f"rank-{r}.json").read_text())
                           for run, r in ((one, 0), (two, 0), (two, 1)))
    assert len(whole) == len(rank0) == len(rank1) >= 4
    for step, (a, b, both) in enumerate(zip(rank0, rank1, whole)):
        assert a["weights"] == b["weights"], f"the processes' weights differ before step {step}"
        assert not set(a["examples"]) & set(b["examples"]), f"both processes trained on one example at step {step}"
        assert sorted(a["examples"] + b["examples"]) == sorted(both["examples"]), step
    for e in range(0, len(rank0) - 1, 2):  # every example once an epoch
        assert len({i for call in rank0[e : e + 2] + rank1[e : e + 2] for i in call["inputs"]}) == 2 * batch_size
    assert rank0[0]["inputs"] != rank0[2]["inputs"], "process 0 got the same shard in epochs 0 and 1"

    assert_same_training(one, two)
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["final.png"]


@pytest.mark.parametrize("config", [TINY, TINY_AUTOENCODER], ids=lambda p: p.stem)
def test_two_processes_train_like_one(tmp_path, fashion_mnist, config):
    assert_two_processes_train_like_one(tmp_path, config)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, trained_tiny_run):
    accumulated = train.train(tiny_config(tmp_path / "accum", train={"grad_accum_steps": 4}))
    assert_same_training(trained_tiny_run, accumulated)
