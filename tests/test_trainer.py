"""The shared trainer on stage 1: learning, determinism, exact resume, safe checkpoints."""

import json
import re
import shutil

import pytest
import torch

import train
from ddpm.checkpoint import latest_good_checkpoint, list_checkpoints, verify_checkpoint
from ddpm.config import apply_overrides, read_yaml
from ddpm.errors import UserError
from ddpm.plots import read_metrics
from ddpm.runs import load_config

from .conftest import checkpoint_weights, losses, tiny_config


def test_loss_falls_on_real_fashion_mnist(tmp_path, fashion_mnist):
    run = train.train(tiny_config(tmp_path / "run", train={"max_steps": 40, "batch_size": 32, "lr": 3e-3,
                                                             "checkpoint_every": 0}, data={"limit": 2048}))
    curve = losses(run)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5, curve


def test_same_seed_same_losses_and_other_seed_differs(tmp_path, fashion_mnist):
    a = losses(train.train(tiny_config(tmp_path / "a", train={"max_steps": 5})))
    b = losses(train.train(tiny_config(tmp_path / "b", train={"max_steps": 5})))
    c = losses(train.train(tiny_config(tmp_path / "c", train={"max_steps": 5, "seed": 1})))
    assert a == b
    assert a != c


def test_resume_continues_the_same_run_exactly(tmp_path, trained_tiny_run):
    """8 steps straight == 4 steps, stop, resume, 4 more: losses, weights, EMA, LR."""
    straight = trained_tiny_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")
    shutil.copytree(straight / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    raw = tiny_config(resumed, train={"resume": "latest"})
    train.train(raw)
    assert losses(resumed) == losses(straight)[4:]
    end_a, end_b = straight / "checkpoints" / "step-00000008", resumed / "checkpoints" / "step-00000008"
    wa, wb = checkpoint_weights(end_a), checkpoint_weights(end_b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights or EMA differ after resume"
    sa, sb = (json.loads((p / "trainer_state.json").read_text()) for p in (end_a, end_b))
    assert sa == sb  # step, EMA step and LR-schedule position


def test_run_writes_grid_metrics_final_model_and_keeps_last_k(trained_tiny_run):
    run = trained_tiny_run
    assert (run / "samples" / "final.png").stat().st_size > 1000
    assert (run / "metrics.png").is_file() and (run / "config.yaml").is_file()
    assert (run / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "final" / "scheduler" / "scheduler_config.json").is_file()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004", "step-00000008"]


def test_existing_run_without_resume_is_refused(trained_tiny_run):
    with pytest.raises(UserError, match="resume=latest"):
        train.train(tiny_config(trained_tiny_run))


def test_corrupt_checkpoints_are_detected_and_latest_falls_back(tmp_path, trained_tiny_run):
    root = tmp_path / "checkpoints"
    shutil.copytree(trained_tiny_run / "checkpoints", root)
    newest = root / "step-00000008"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        verify_checkpoint(newest)
    warnings = []
    assert latest_good_checkpoint(root, warn=warnings.append) == root / "step-00000004"
    assert "step-00000008" in warnings[0]
    (root / "step-00000004" / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="missing optimizer.pt"):
        verify_checkpoint(root / "step-00000004")


def test_checkpoint_of_another_stage_is_refused(tmp_path, trained_tiny_run):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_tiny_run / "checkpoints" / "step-00000004", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["stage"] = "latent"
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "manifest.json").unlink()  # re-sign it, as a real checkpoint of that stage would be
    from ddpm.checkpoint import save_checkpoint

    def copy_into(folder):
        for item in ckpt.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy)(item, folder / item.name)

    signed = save_checkpoint(tmp_path / "other", 4, copy_into, keep_last=1)
    with pytest.raises(UserError, match="checkpoint of stage 'latent'"):
        train.train(tiny_config(tmp_path / "run", train={"resume": str(signed)}))


def test_pickle_payload_in_optimizer_state_is_refused(tmp_path):
    import pickle

    from ddpm.checkpoint import load_torch_state

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "optimizer.pt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="refusing to load"):
        load_torch_state(path)


@pytest.mark.parametrize("override, message", [
    ({"train": {"lrr": 1.0}}, "unknown key train.lrr; valid keys in train: output_dir"),
    ({"train": {"lr": -1.0}}, "train.lr must be > 0"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    ({"train": {"batch_size": "big"}}, "train.batch_size must be int"),
    ({"model": {"block_out_chanels": [8]}}, "unknown key model.block_out_chanels; valid UNet2DModel keys"),
    ({"model": {"num_class_embeds": 3}}, "model.num_class_embeds is set from the data"),
    ({"diffusion": {"prediction_type": "x0"}}, "diffusion.prediction_type must be one of 'epsilon'"),
    ({"sampel": {"steps": 3}}, "unknown section 'sampel'"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, override, message):
    raw = tiny_config(tmp_path)
    for section, values in override.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(UserError, match=message) as e:
        load_config(raw)
    assert "\n" not in str(e.value)


def test_tensorboard_without_its_package_says_which_extra_installs_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args))
    with pytest.raises(UserError, match=re.escape("needs TensorBoard: pip install -e '.[trackers]'")):
        load_config(tiny_config(tmp_path, train={"trackers": ["tensorboard"]}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU")
def test_fp16_without_a_gpu_is_refused_not_silently_fp32(tmp_path):
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train.train(tiny_config(tmp_path / "fp16", train={"mixed_precision": "fp16"}))
    assert not (tmp_path / "fp16").exists()


def test_batch_order_visits_every_example_once_per_epoch():
    order = train.BatchOrder(100, 10, seed=0, device=torch.device("cpu"))
    epoch0 = torch.cat([order.indices(s) for s in range(10)])
    epoch1 = torch.cat([order.indices(s) for s in range(10, 20)])
    assert sorted(epoch0.tolist()) == list(range(100)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_evaluation_during_training_lands_in_metrics_and_plot(tmp_path, fashion_mnist):
    run = train.train(tiny_config(tmp_path / "eval", train={"max_steps": 4, "eval_every": 2, "eval_n": 20}))
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0 <= r["eval_accuracy"] <= 1 and r["eval_fd"] > 0 and r["eval_fd_floor"] > 0 and r["eval_n"] == 20
    assert (run / "metrics.png").is_file()


def test_overrides_and_config_files_read_numbers_as_people_write_them(tmp_path):
    # PyYAML alone (YAML 1.1) reads 1e-3 as the string "1e-3"
    raw = apply_overrides(tiny_config(tmp_path), ["train.lr=2e-4", "train.weight_decay=1E-2", "train.ema_decay=.5",
                                                  "model.block_out_channels=[8, 16]", "sample.scheduler=ddim"])
    cfg = load_config(raw)[1]
    assert (cfg.lr, cfg.weight_decay, cfg.ema_decay) == (2e-4, 1e-2, 0.5)
    assert raw["model"]["block_out_channels"] == [8, 16] and raw["sample"]["scheduler"] == "ddim"
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n  output_dir: 1e3x\n")
    assert read_yaml(tmp_path / "c.yaml")["train"] == {"lr": 3e-4, "output_dir": "1e3x"}
    with pytest.raises(UserError, match="not valid YAML"):
        apply_overrides({}, ["model.block_out_channels=[8, 16"])


def test_preview_grids_reach_wandb_and_tensorboard_inside_the_run(tmp_path, fashion_mnist, monkeypatch):
    """Every preview grid is an image in each tracker, and each tracker writes under the run."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # where wandb would write its folder if not told otherwise
    run = train.train(tiny_config(tmp_path / "run", train={"trackers": ["wandb", "tensorboard"], "sample_every": 4,
                                                           "checkpoint_every": 0}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "a tracker wrote outside the run directory"
    grids = {4: run / "samples" / "step-00000004.png", 8: run / "samples" / "step-00000008.png"}

    def pixels(png_bytes_or_path):
        return np.asarray(Image.open(png_bytes_or_path).convert("RGB"))

    board = EventAccumulator(str(run / run.name), size_guidance={IMAGES: 0})  # TensorBoard's folder
    board.Reload()
    logged = {e.step: e.encoded_image_string for e in board.Images("samples")}
    assert sorted(logged) == [4, 8]
    for step, png in grids.items():
        assert np.array_equal(pixels(io.BytesIO(logged[step])), pixels(png))
    assert [e.step for e in board.Images("final")] == [8]

    (offline,) = (run / "wandb").glob("offline-run-*")
    media = sorted((offline / "files" / "media" / "images").glob("samples_*.png"))
    assert [int(p.name.split("_")[1]) for p in media] == [4, 8]
    assert np.array_equal(pixels(media[0]), pixels(grids[4]))


def test_posthoc_ema_snapshots_resume_exactly_and_kept_steps_stay(tmp_path, fashion_mnist):
    """The power-function EMAs are written every posthoc_every steps and restored on resume (the snapshots
    after a resume equal those of the straight run); a checkpoint of keep_steps outlives keep_last; a run
    whose own EMA is the 0.05 profile (ema_sigma_rel) ends with the last snapshot's 0.05 weights."""
    posthoc = {"posthoc_ema": [0.05, 0.1], "posthoc_every": 2, "keep_steps": [2], "ema_sigma_rel": 0.05}
    straight = train.train(tiny_config(tmp_path / "straight", train=posthoc))
    assert [p.name for p in list_checkpoints(straight / "checkpoints")] == ["step-00000002", "step-00000004",
                                                                             "step-00000008"]
    snapshots = sorted(p.name for p in (straight / "posthoc").iterdir())
    assert snapshots == [f"step-0000000{s}.safetensors" for s in (2, 4, 6, 8)]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    train.train(tiny_config(resumed, train={**posthoc, "resume": "latest"}))
    from safetensors.torch import load_file

    for step in (6, 8):
        a, b = (load_file(run / "posthoc" / f"step-0000000{step}.safetensors") for run in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"snapshot {step} differs"
    first = load_file(straight / "posthoc" / "step-00000002.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a), "the EMAs did not move"
    final = load_file(straight / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, a[f"0.05/{k}"]) for k, v in final.items()), "final/unet is not the 0.05 profile"
