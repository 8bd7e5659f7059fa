"""Stage 2: our autoencoder, pretrained autoencoders, the latent cache and its scaling factor,
and latent diffusion trained and sampled like stage 1."""

import json
import re

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

import train
from ddpm.config import read_yaml
from ddpm.errors import UserError
from ddpm.data import DataConfig, load_training_set
from ddpm.runs import load_config, load_run
from ddpm.metrics import psnr
from latent.autoencoder import AutoencoderStage, AutoencoderWithDiscriminator, adaptive_gan_weight
from latent.perceptual import RandomFeatureDistance
from latent.cache import cache_path, fingerprint, load_or_build, read_scaling_factor
from latent.space import LatentSpace, load_autoencoder

from .conftest import (ROOT, SHARED_MODELS, TINY_AUTOENCODER, TINY_LATENT, assert_resume_is_exact,
                       assert_two_processes_train_like_one, one_line_error, run, tiny_config)


def tiny_kl(in_channels=1, blocks=3, seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                         block_out_channels=[8] * blocks, norm_num_groups=4, layers_per_block=1)


def some_images(n=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 8:20] = torch.randint(60, 255, (n, 16, 12), generator=g, dtype=torch.uint8)
    return images


# -- our own autoencoder ----------------------------------------------------------------


def test_autoencoder_run_trains_saves_and_reports(trained_tiny_autoencoder):
    run_dir = trained_tiny_autoencoder
    vae = load_autoencoder(str(run_dir))  # an autoencoder run resolves to its final/vae
    assert isinstance(vae, AutoencoderKL) and vae.config.in_channels == 1
    assert (run_dir / "samples" / "final.png").stat().st_size > 1000  # originals above reconstructions
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    # the checkpoint keeps the discriminator, final/ only the autoencoder
    ema = AutoencoderWithDiscriminator.from_pretrained(run_dir / "checkpoints" / "step-00000006" / "ema")
    assert ema.discriminator is not None and not (run_dir / "final" / "discriminator").exists()


def test_autoencoder_learns_to_reconstruct(tmp_path, fashion_mnist):
    run_dir = train.train(tiny_config(tmp_path / "ae", TINY_AUTOENCODER, loss={"disc_weight": 0.0},
                                      train={"max_steps": 60, "batch_size": 32, "lr": 3e-3}))
    stage, _, _ = load_run(run_dir)
    before = stage.evaluate(AutoencoderStage(stage.config).build_model(), 200)
    after = stage.evaluate(stage.load_model(run_dir / "final"), 200)
    assert after["eval_psnr"] > before["eval_psnr"] + 3, (before, after)
    # the ceiling of latent models on it: its reconstructions' FD, above the real floor, falls with training
    assert after["eval_fd_floor"] == before["eval_fd_floor"] < after["eval_recon_fd"] < before["eval_recon_fd"]


def test_discriminator_and_decoder_losses_move_only_their_own_network():
    model = AutoencoderWithDiscriminator(dict(tiny_kl().config), use_discriminator=True, disc_channels=8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = model(x, torch.randn(2, 4, 8, 8))
    (-out["fake_logits"].mean()).backward(retain_graph=True)  # the decoder's GAN term
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert model.vae.decoder.conv_out.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    (out["real_logits"].mean() + out["detached_fake_logits"].mean()).backward()  # the discriminator's
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())


def test_gan_terms_switch_on_at_disc_start():
    stage = AutoencoderStage.from_dict({"model": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4,
                                                  "down_block_types": ["DownEncoderBlock2D"] * 3,
                                                  "up_block_types": ["UpDecoderBlock2D"] * 3},
                                        "loss": {"disc_weight": 0.5, "disc_start": 10, "disc_channels": 8}})
    model = stage.build_model()
    raw = {"images": some_images(4), "labels": torch.zeros(4, dtype=torch.long)}
    for step, expect_grad in ((9, False), (10, True)):
        batch = stage.make_batch(raw, torch.Generator().manual_seed(0), step)
        assert batch["eps"].shape == (4, 4, 8, 8)
        model.zero_grad(set_to_none=True)
        stage.loss(model, batch)["loss"].backward()
        d_grad = sum(p.grad.abs().sum() for p in model.discriminator.parameters())
        assert (d_grad > 0) == expect_grad


def test_adaptive_gan_weight_is_the_ratio_of_the_two_gradients_at_the_last_layer():
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert weight.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad  # a constant for backward: it scales the GAN term, it is not minimised
    assert adaptive_gan_weight((w * a).sum(), (w * 0).sum(), w).item() == 1e4  # no GAN gradient: the cap


def autoencoder_stage(**loss) -> AutoencoderStage:
    return AutoencoderStage.from_dict({"model": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4,
                                                 "down_block_types": ["DownEncoderBlock2D"] * 3,
                                                 "up_block_types": ["UpDecoderBlock2D"] * 3},
                                       "loss": {"disc_channels": 8, **loss}})


def test_adaptive_weight_makes_the_gan_pull_at_the_output_disc_weight_times_the_reconstructions():
    """SD's rule: at the decoder's last layer the weighted GAN term's gradient has disc_weight times
    the norm of the reconstruction terms' (L1 + perceptual) gradient, whatever the logits' scale."""
    stage = autoencoder_stage(disc_weight=0.5, adaptive_disc_weight=True, perceptual_weight=1.0)
    model = stage.build_model()
    batch = stage.make_batch({"images": some_images(4)}, torch.Generator().manual_seed(0), step=0)
    parts = stage.loss(model, batch)
    assert parts["gan_weight"] > 0 and parts["perceptual"] > 0
    last = model.vae.decoder.conv_out.weight
    out = model(batch["x"], batch["eps"])
    rec = (out["recon"] - batch["x"]).abs().mean() + stage.perceptual(batch["x"], out["recon"])
    gan = -out["fake_logits"].mean()
    g_rec, g_gan = (torch.autograd.grad(t, last, retain_graph=True)[0].norm() for t in (rec, gan))
    assert (parts["gan_weight"] * g_gan).item() == pytest.approx(0.5 * g_rec.item(), rel=1e-3)


def test_perceptual_distance_is_fixed_has_no_weights_to_train_and_sees_blur():
    a, b = RandomFeatureDistance(), RandomFeatureDistance()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # one seed: every process alike
    assert not any(p.requires_grad for p in a.parameters())
    x = some_images(8).float()[:, None] / 127.5 - 1
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    noisy = x + (blurred - x).abs().mean() * torch.randn_like(x).sign()  # the same L1 error as the blur
    assert a(x, x).item() == 0
    assert a(x, blurred) > 2 * a(x, noisy)  # a blur loses structure the L1 error does not weigh
    stage = autoencoder_stage(perceptual_weight=1.0)
    model = stage.build_model()
    assert not any(name.startswith("perceptual") for name in model.state_dict())  # nothing saved, nothing trained


def test_psnr():
    a = torch.full((1, 28, 28), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, :] += 51  # 28 of 784 pixels off by 0.2
    assert psnr(b, a).item() == pytest.approx(10 * torch.log10(torch.tensor(784 / 28 / 0.04)).item(), abs=1e-3)
    known = torch.zeros(1, 28, 28, dtype=torch.bool)
    known[0, :2] = True  # the off row and one exact row: 28 of 56 pixels off
    assert psnr(b, a, known).item() == pytest.approx(10 * torch.log10(torch.tensor(56 / 28 / 0.04)).item(), abs=1e-3)


# -- pretrained autoencoders --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_pretrained_rgb_autoencoder_folder(tmp_path, kind):
    """An RGB autoencoder with down factor 8 sees 64 px images and gives 8 x 8 latents."""
    torch.manual_seed(0)
    vae = tiny_kl(in_channels=3, blocks=4) if kind == "kl" else AutoencoderTiny(
        encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4,
        num_encoder_blocks=[1, 1, 1, 1], num_decoder_blocks=[1, 1, 1, 1])
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(str(tmp_path / "vae"))
    assert type(loaded) is type(vae)
    space = LatentSpace(loaded, scaling_factor=0.5)
    assert space.image_size == 64 and space.latent_shape == (4, 8, 8)
    images = some_images(3)
    latents = space.encode(images)
    assert latents.shape == (3, 4, 8, 8)
    decoded = space.decode(latents)
    assert decoded.shape == (3, 28, 28) and decoded.dtype == torch.uint8
    assert torch.equal(decoded, space.reconstruct(images))


def test_missing_or_wrong_autoencoder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no run has been trained
    with pytest.raises(UserError, match="does not exist"):
        load_autoencoder(str(tmp_path / "nowhere"))
    # runs/NAME looks like a Hub name ("owner/name"): it is a run not trained yet, and its preset is named
    with pytest.raises(UserError, match=re.escape("autoencoder run or folder runs/autoencoder_fashion_unheard_of "
                                                  "does not exist (a path here, so not looked up on the Hub); "
                                                  "train it first, or check the path")):
        load_autoencoder("runs/autoencoder_fashion_unheard_of")
    with pytest.raises(UserError, match=re.escape("train it first: python train.py configs/autoencoder_fashion.yaml")):
        load_autoencoder("runs/autoencoder_fashion")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot read the autoencoder config"):
        load_autoencoder(str(tmp_path / "empty"))


@pytest.mark.skipif(not (SHARED_MODELS / "taesd").is_dir(), reason="../shared/models/taesd is not here")
def test_real_taesd_reconstructs_fashion_mnist(fashion_mnist):
    space = LatentSpace(load_autoencoder(str(SHARED_MODELS / "taesd")))
    assert isinstance(space.vae, AutoencoderTiny) and space.latent_shape == (4, 8, 8)
    images = fashion_mnist.images[:64]
    assert psnr(space.reconstruct(images), images).mean() > 15


# -- the latent cache and the scaling factor ----------------------------------------------


def test_cache_is_built_once_reused_and_invalidated(tmp_path):
    space, images, said = LatentSpace(tiny_kl()), some_images(), []
    cached = load_or_build(space, images, tmp_path, flip=True, batch_size=10, say=said.append)
    assert cached["latents"].shape == cached["latents_flipped"].shape == (24, 4, 8, 8)
    assert any("encoded 24 images" in line for line in said)
    factor = space.scaling_factor
    scaled = torch.cat([cached["latents"], cached["latents_flipped"]]) * factor
    assert abs(scaled.std().item() - 1) < 0.05
    path = cache_path(tmp_path, fingerprint(space, images, True))
    assert read_scaling_factor(path) == pytest.approx(factor)

    said.clear()
    space.scaling_factor = None
    again = load_or_build(space, images, tmp_path, flip=True, say=said.append)
    assert not any("encoded" in line for line in said) and space.scaling_factor == pytest.approx(factor)
    assert torch.equal(again["latents"], cached["latents"])

    # a changed autoencoder, or other images, get their own cache
    with torch.no_grad():
        space.vae.encoder.conv_in.bias.add_(0.1)
    assert fingerprint(space, images, True) != fingerprint(LatentSpace(tiny_kl()), images, True)
    assert fingerprint(LatentSpace(tiny_kl()), images[:-1], True) != path.name

    # a damaged file is encoded again
    path.write_bytes(path.read_bytes()[:100])
    said.clear()
    load_or_build(LatentSpace(tiny_kl()), images, tmp_path, flip=True, say=said.append)
    assert any("damaged" in line for line in said) and read_scaling_factor(path) == pytest.approx(factor)


STATS = {"scaling_factor": 0.7, "channel_mean": [0.5, -1.0, 2.0, 0.0], "channel_std": [2.0, 0.5, 1.0, 3.0]}


@pytest.mark.parametrize("per_channel", [False, True])
def test_folding_the_normalisation_keeps_latents_and_decodes(trained_tiny_autoencoder, per_channel):
    """A pipeline that knows only scaling_factor (0.08333, the upscaler's) gets our normalised latents
    from the folded autoencoder, and its decoder sees the same numbers."""
    space = LatentSpace(load_autoencoder(str(trained_tiny_autoencoder)), per_channel=per_channel)
    space.measure(STATS)
    folded = space.folded(0.08333)
    assert folded.vae.config.scaling_factor == 0.08333 and space.vae.config.scaling_factor != 0.08333
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    scale = torch.tensor(STATS["channel_std"]).view(-1, 1, 1).reciprocal() if per_channel else 0.7
    with torch.no_grad():
        ours, theirs = space.vae.encode(x).latent_dist, folded.vae.encode(x).latent_dist
        torch.testing.assert_close(theirs.mean * 0.08333, space.normalize(ours.mean), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.std * 0.08333, ours.std * scale, atol=1e-5, rtol=1e-4)
        z = torch.randn(3, 4, 8, 8)
        torch.testing.assert_close(folded.vae.decode(folded.denormalize(z)).sample,
                                   space.vae.decode(space.denormalize(z)).sample, atol=1e-4, rtol=1e-4)


def test_per_channel_latents_are_standardised_and_saved_folded(trained_tiny_autoencoder, tmp_path):
    space = LatentSpace(load_autoencoder(str(trained_tiny_autoencoder)), per_channel=True)
    images = load_training_set(DataConfig(limit=64))["images"]
    cached = load_or_build(space, images, tmp_path / "cache", flip=False, say=lambda _: None)
    z = space.normalize(cached["latents"]).transpose(0, 1).flatten(1)
    torch.testing.assert_close(z.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(4), atol=1e-4, rtol=0)
    space.save_pretrained(tmp_path / "vae")
    saved = LatentSpace.from_pretrained(tmp_path / "vae")  # what final/vae and diffusers' pipelines read
    assert saved.vae.config.scaling_factor == 1.0 and not saved.per_channel
    torch.testing.assert_close(saved.encode(images[:8]), space.encode(images[:8]), atol=1e-4, rtol=1e-4)
    assert (saved.decode(space.encode(images[:8])).int() - space.decode(space.encode(images[:8])).int()).abs().max() <= 1


def test_per_channel_needs_quant_convs():
    with pytest.raises(UserError, match="per_channel"):
        LatentSpace(AutoencoderTiny(in_channels=1, out_channels=1, encoder_block_out_channels=(8, 8, 8, 8),
                                    decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                                    num_decoder_blocks=(1, 1, 1, 1)), per_channel=True)


def test_one_scaling_factor_from_cache_to_training_to_decoding(trained_tiny_latent_run):
    """Training latents have std 1, and what the sampler decodes them with uses the same factor:
    decoding a training latent gives the autoencoder's own reconstruction of that image."""
    stage, _, _ = load_run(trained_tiny_latent_run)
    data = stage.load_data()
    assert abs(torch.cat([data["latents"], data["latents_flipped"]]).std().item() - 1) < 0.05
    factor = stage.space.latent_space().scaling_factor
    saved = LatentSpace.from_pretrained(trained_tiny_latent_run / "final" / "vae")
    assert saved.scaling_factor == pytest.approx(factor)
    direct = saved.reconstruct(load_training_set(stage.config.data)["images"][:16])
    error = lambda space: (space.decode(data["latents"][:16]).int() - direct.int()).abs()  # noqa: E731
    for space in (saved, stage.space.latent_space()):
        # equal up to float rounding: z * f / f, and the cache was encoded in batches of another size
        assert error(space).max() <= 1
    wrong = LatentSpace(saved.vae, saved.image_size, factor * 1.5)
    assert error(wrong).float().mean() > 2, error(wrong).float().mean()


def test_latent_run_samples_and_evaluates_like_a_pixel_run(trained_tiny_latent_run, tmp_path):
    run_dir = trained_tiny_latent_run
    assert {p.name for p in (run_dir / "final").iterdir()} == {"unet", "scheduler", "vae"}
    grid = tmp_path / "latent.png"
    result = run("sample.py", str(run_dir), "--class", "all", "--n", "2", "--steps", "2", "--out", str(grid))
    assert result.returncode == 0, result.stderr
    assert grid.stat().st_size > 1000
    # a checkpoint has no vae/: the factor comes back from the cache
    result = run("sample.py", str(run_dir / "checkpoints" / "step-00000006"), "--class", "0", "--n", "2",
                 "--steps", "2", "--save-array", str(tmp_path / "a.npy"), "--out", str(tmp_path / "c.png"))
    assert result.returncode == 0, result.stderr
    result = run("sample.py", str(run_dir), "--evaluate", "--n", "20", "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout


def test_autoencoder_run_in_sample_py(trained_tiny_autoencoder, tmp_path):
    result = run("sample.py", str(trained_tiny_autoencoder), "--evaluate", "--n", "50")
    assert result.returncode == 0, result.stderr
    assert "psnr" in result.stdout
    result = run("sample.py", str(trained_tiny_autoencoder), "--out", str(tmp_path / "r.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_latent_config_errors_are_one_line(tmp_path):
    result = run("train.py", "configs/latent_fashion_tiny.yaml", f"train.output_dir={tmp_path}/x",
                 f"autoencoder.source={tmp_path}/missing")
    one_line_error(result, "does not exist")
    result = run("train.py", "configs/latent_fashion_tiny.yaml", "autoencoder.colour=1")
    one_line_error(result, "autoencoder.colour")
    result = run("train.py", "configs/autoencoder_fashion_tiny.yaml", "model.sample_size=64")
    one_line_error(result, "model.sample_size is set from the data")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path, request):
    raw = read_yaml(path)
    if "init_from" in raw:  # DreamBooth and image conditions start from a text run: here a tiny one on CLIP
        raw["init_from"] = str(request.getfixturevalue("trained_tiny_text_run"))
    stage, cfg, resolved = load_config(raw)
    assert resolved["stage"] == stage.name and cfg.output_dir.startswith("runs/")


# -- exact resume and several processes, for both stage-2 stages ----------------------------


@pytest.mark.parametrize("fixture", ["trained_tiny_autoencoder", "trained_tiny_latent_run"])
def test_resume_continues_the_same_run_exactly(request, tmp_path, fixture):
    """6 steps straight == 3 steps, stop, resume, 3 more (the autoencoder's discriminator
    switches on at step 3, inside the resumed part)."""
    assert_resume_is_exact(request.getfixturevalue(fixture), tmp_path / "resumed")


EVERY_LOSS_TERM = {"perceptual_weight": 1.0, "disc_weight": 0.5, "adaptive_disc_weight": True}


def test_two_processes_train_the_autoencoder_like_one(tmp_path):
    """With the perceptual term, and the discriminator and its adaptive weight (gradients averaged
    over both processes) on from step 3 of 6."""
    assert_two_processes_train_like_one(tmp_path, TINY_AUTOENCODER,
                                        *(f"loss.{k}={str(v).lower()}" for k, v in EVERY_LOSS_TERM.items()))


def test_resume_is_exact_with_every_autoencoder_loss_term(tmp_path):
    run = train.train(tiny_config(tmp_path / "straight", TINY_AUTOENCODER, loss=EVERY_LOSS_TERM))
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reconstruction", "perceptual", "kl", "gan_weight", "discriminator"} <= logged.keys()
    assert_resume_is_exact(run, tmp_path / "resumed")


def test_two_processes_train_the_latent_stage_like_one(tmp_path, trained_tiny_autoencoder):
    """The main process builds the latent cache while the other waits, then both train."""
    cache = tmp_path / "cache"
    assert_two_processes_train_like_one(tmp_path, TINY_LATENT, f"autoencoder.source={trained_tiny_autoencoder}",
                                        f"autoencoder.cache_dir={cache}")
    assert len(list(cache.glob("latents-*.safetensors"))) == 1


def test_web_page_is_for_runs_that_generate(trained_tiny_autoencoder):
    from ddpm.web import Explorer

    with pytest.raises(UserError, match="makes no new images"):
        Explorer(trained_tiny_autoencoder)
