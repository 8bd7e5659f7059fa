"""The speed benchmarks: they run end to end, and the fast path computes what the plain path does.

The issue's check: for the same batch and weights, the loss does not depend on the path
(bf16 autocast or fp32, our ``stage.loss`` or the reference loop's textbook loss), and the
reference loop's PIL pipeline feeds the model the same pixels as our on-device one.
"""

import re

import pytest
import torch
import yaml

from benchmarks import book, pixel_vs_latent, sample_speed, train_speed
from ddpm import evaluate
from ddpm.data import to_model_space
from ddpm.errors import UserError
from ddpm.judge import Judge
from ddpm.runs import load_config, load_for_sampling

from .conftest import TINY, tiny_config
from .test_commands import book_command_arguments


@pytest.fixture(scope="module")
def trained_batch(tmp_path_factory, trained_tiny_run):
    """(stage, trained tiny model in fp32 on the CPU, one training batch from ``stage.make_batch``)."""
    stage, cfg, _ = load_config(tiny_config(tmp_path_factory.mktemp("unused")))
    model = stage.load_model(trained_tiny_run / "final").train()
    raw = {k: v[: cfg.batch_size] for k, v in stage.load_data().items()}
    batch = stage.make_batch(raw, torch.Generator().manual_seed(0))
    return stage, model, batch


@torch.no_grad()
def test_bf16_autocast_loss_matches_fp32(trained_batch):
    stage, model, batch = trained_batch
    fp32 = stage.loss(model, batch).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = stage.loss(model, batch).item()
    assert bf16 == pytest.approx(fp32, rel=2e-2)


@torch.no_grad()
def test_reference_loss_equals_stage_loss(trained_batch):
    stage, model, batch = trained_batch
    reference = train_speed.reference_loss(model, stage.scheduler, batch["x0"], batch["noise"], batch["timesteps"],
                                           batch["labels"])
    assert reference.item() == pytest.approx(stage.loss(model, batch).item(), abs=1e-6)


def test_reference_pil_pipeline_gives_our_pixels(fashion_mnist):
    images, labels = fashion_mnist.images[:8], fashion_mnist.labels[:8]
    dataset = train_speed.PILFashionMNIST(images, labels, flip=False)
    pil = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert pil.shape == (8, 1, 32, 32)
    torch.testing.assert_close(pil, to_model_space(images), atol=1e-6, rtol=0)
    assert [dataset[i][1] for i in range(8)] == labels.tolist()


def test_train_speed_prints_both_loops_and_their_ratio(fashion_mnist, capsys):
    assert train_speed.main([str(TINY), "--steps", "2", "--warmup", "1", "train.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "global batch 8;" in out, "an override after the options applies"
    rates = dict(re.findall(r"^\| (reference|ours) .*? \| [\w ]+ \| ([\d,.]+) \|", out, re.M))
    assert rates.keys() == {"reference", "ours"}, out
    assert all(float(v.replace(",", "")) > 0 for v in rates.values())
    ratio = re.search(r"ours / reference: \*\*([\d.]+)x\*\*", out)
    assert ratio and float(ratio.group(1)) > 0, out


def test_sample_speed_times_each_sampler(trained_tiny_run, capsys):
    argv = [str(trained_tiny_run), "--n", "10", "--samplers", "ddim-2", "dpm++-3", "--no-score"]
    assert sample_speed.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| ddim-2 \| 4 \| [\d,.]+ \|", out, re.M), out  # 2 steps x 2 CFG branches
    assert re.search(r"^\| dpm\+\+-3 \| 6 \| [\d,.]+ \|", out, re.M), out


def test_sample_speed_scores_as_evaluate_model_does(trained_tiny_run, monkeypatch):
    """Same labels, seed and settings: the same numbers as ``sample.py --evaluate``. Without the
    shipped judge, a random-weight one stands in: this checks the plumbing, not the judge."""
    try:
        evaluate.cached_judge()
    except UserError:
        torch.manual_seed(0)
        judge = Judge().eval()
        monkeypatch.setattr(evaluate, "cached_judge", lambda device="cpu": judge)
        monkeypatch.setattr(sample_speed, "cached_judge", lambda device="cpu": judge)
    stage, model, _ = load_for_sampling(trained_tiny_run, "cpu")
    [row] = sample_speed.benchmark(stage, model, [("ddim", 2)], n=20, guidance=3.0, batch_size=500)
    report = evaluate.evaluate_model(stage, model, 20, guidance=3.0, scheduler="ddim", steps=2)
    assert row["images_per_s"] > 0
    for key in ("accuracy", "fd", "fd_floor"):
        assert row[key] == pytest.approx(report[key], abs=1e-9), key


def test_sample_speed_leaves_ddpm_1000_out_on_a_cpu_unless_asked():
    assert "ddpm-1000" not in sample_speed.parse_args(["RUN", "--device", "cpu"]).samplers
    assert sample_speed.parse_args(["RUN", "--device", "cpu", "--samplers", "ddpm-1000"]).samplers == ["ddpm-1000"]


def test_sample_speed_rejects_an_unknown_sampler():
    with pytest.raises(UserError, match="unknown sampler"):
        sample_speed.parse_sampler("plms")
    assert sample_speed.parse_sampler("dpm++") == ("dpm++", 20)
    assert sample_speed.parse_sampler("ddpm-7") == ("ddpm", 7)


def test_pixel_vs_latent_compares_two_runs(trained_tiny_run, trained_tiny_latent_run, tmp_path, capsys):
    argv = [str(trained_tiny_run), str(trained_tiny_latent_run), "--n", "20", "--timed-steps", "1"]
    assert pixel_vs_latent.main(argv) == 0
    table = capsys.readouterr().out
    assert "| 1x32x32 |" in table and "| 4x8x8 |" in table and "FLOPs per training image" in table
    assert "| 8 x 16 |" in table  # the tiny preset's train.max_steps x train.batch_size
    # a config that is not trained yet, as long as train.epochs says (2 x 256 images / 16): its cost, no scores
    raw = tiny_config(tmp_path / "run", train={"max_steps": None, "epochs": 2})
    (tmp_path / "by_epochs.yaml").write_text(yaml.safe_dump(raw))
    argv = [str(tmp_path / "by_epochs.yaml"), str(trained_tiny_latent_run), "--n", "20", "--timed-steps", "1"]
    assert pixel_vs_latent.main(argv) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "| 1x32x32 |" in line)
    assert row.endswith("| - | - | - | - | - |") and "| 32 x 16 |" in row


def test_the_book_trains_every_stage_in_order_on_the_tiny_configs(tmp_path, fashion_mnist, capsys):
    """benchmarks/book.py --tiny: the whole chain, each run on the ones before it, and one table."""
    out = tmp_path / "book"
    assert book.main(book_command_arguments(out)) == 0  # benchmarks/README.md's command
    table = capsys.readouterr().out
    for name, _, needs in book.CHAIN:
        assert (out / name / "final").is_dir(), name
        assert f"| `{name}` |" in table
        resolved = yaml.safe_load((out / name / "config.yaml").read_text())
        for key, run in needs.items():
            section, _, field = key.partition(".")
            given = resolved[section][field] if field else resolved[section]
            assert given == str(out / run), f"{name}'s {key} is not the chain's {run}"
    assert "PSNR" in table and "zero-shot" in table and "FD boxes" in table and "subject likeness" in table
    assert yaml.safe_load((out / "dreambooth_fashion_lora" / "config.yaml").read_text())["lora"]["rank"] == 4


def test_the_book_asks_for_the_runs_a_step_needs(tmp_path, capsys):
    assert book.main(["--tiny", "--only", "latent_fashion", "--out-dir", str(tmp_path)]) == 2
    assert "latent_fashion needs the finished run(s) autoencoder_fashion in" in capsys.readouterr().err
