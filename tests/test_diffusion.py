"""The diffusion maths of stage 1: noising, timesteps, label dropout, guidance, loss."""

import pytest
import torch

from ddpm.diffusion import clip_denoised, predicted_x0
from ddpm.stage import ClassConditionedDDPM


def make_stage(**diffusion) -> ClassConditionedDDPM:
    return ClassConditionedDDPM.from_dict({
        "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                  "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]},
        "diffusion": diffusion,
    })


def fake_raw(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8),
            "labels": torch.randint(0, 10, (n,), generator=g)}


def test_noising_matches_closed_form():
    stage = make_stage()
    batch = stage.make_batch(fake_raw(64), torch.Generator().manual_seed(0))
    x0, noise, t = batch["x0"], batch["noise"], batch["timesteps"]
    # abar_t = prod_{s <= t} (1 - beta_s), from the betas of the linear schedule
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(stage.scheduler.add_noise(x0, noise, t), expected, atol=1e-5, rtol=1e-5)


def test_timesteps_cover_zero_to_T_minus_one():
    stage = make_stage(num_train_timesteps=50)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([stage.make_batch(fake_raw(256), g)["timesteps"] for _ in range(8)])
    assert seen.min() == 0 and seen.max() == 49
    assert len(seen.unique()) == 50


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_label_dropout_rate(p):
    stage = make_stage(p_uncond=p)
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([stage.make_batch(fake_raw(1000), g)["labels"] for _ in range(10)])
    rate = (labels == stage.condition.null_label).float().mean().item()
    # 10,000 draws: the standard error is <= 0.005, so 0.02 is four of them
    assert abs(rate - p) < 0.02


def test_guidance_zero_is_unconditional_and_one_is_conditional():
    stage = make_stage()
    stage.config.sample.clip_denoised = False  # the raw guided output (clipping is tested below)
    model = stage.build_model().eval()
    x, t = torch.randn(4, 1, 32, 32), torch.tensor(500)
    labels = torch.tensor([0, 3, 7, 9])
    condition = stage.condition.class_condition(labels)
    null = stage.condition.null_condition(condition)
    with torch.no_grad():
        cond = model(x, t, class_labels=labels).sample
        uncond = model(x, t, class_labels=torch.full_like(labels, stage.condition.null_label)).sample
        for w, expected in ((0.0, uncond), (1.0, cond), (3.0, uncond + 3 * (cond - uncond))):
            torch.testing.assert_close(stage.predict(model, x, t, condition, null, w), expected, atol=1e-5, rtol=1e-4)
        # the batched 2B path (w not in {0, 1}) must agree with separate passes at w = 1 too
        mixed = stage.predict(model, x, t, condition, null, 1.0 + 1e-9)
        torch.testing.assert_close(mixed, cond, atol=1e-5, rtol=1e-4)
        # composed (Liu et al. 2022): each condition pulls with its weight, a negative one pushes away
        others = torch.tensor([1, 1, 2, 2])
        other = model(x, t, class_labels=others).sample
        others_condition = stage.condition.class_condition(others)
        composed = stage.predict(model, x, t, [condition, others_condition], null, 3.0, [0.7, -0.2])
        expected = uncond + 3 * (0.7 * (cond - uncond) - 0.2 * (other - uncond))
        torch.testing.assert_close(composed, expected, atol=1e-5, rtol=1e-4)
        one = stage.predict(model, x, t, [condition], null, 3.0, [1.0])  # one condition, weight 1: plain CFG
        torch.testing.assert_close(one, uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-4)


def test_v_prediction_target_and_min_snr_weights():
    stage = make_stage(prediction_type="v_prediction", snr_gamma=5.0)
    batch = stage.make_batch(fake_raw(8), torch.Generator().manual_seed(0))
    x0, noise, t = batch["x0"], batch["noise"], batch["timesteps"]
    abar = stage.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    from ddpm.diffusion import diffusion_loss

    # a perfect v prediction has zero loss; predicting eps instead does not
    assert diffusion_loss(stage.diffusion, v, x0, noise, t).max().item() < 1e-10
    assert diffusion_loss(stage.diffusion, noise, x0, noise, t).mean().item() > 1e-3


def test_lognormal_noise_levels_follow_edm_distribution():
    """EDM's training noise levels: ln sigma_t of the drawn timesteps ~ N(P_mean, P_std^2), up to the table's
    spacing (sigma_t changes by < 2% from one timestep to the next past t = 50)."""
    from ddpm.diffusion import sigmas

    stage = make_stage(lognormal_noise=[-1.2, 1.2])
    g = torch.Generator().manual_seed(0)
    t = torch.cat([stage.make_batch(fake_raw(512), g)["timesteps"] for _ in range(16)])
    log_sigma = sigmas(stage.diffusion).log()[t]
    assert abs(log_sigma.mean().item() + 1.2) < 0.05 and abs(log_sigma.std().item() - 1.2) < 0.05
    assert abs((t < 100).float().mean().item() - 0.54) < 0.03  # P(sigma < sigma_100 = 0.342); uniform: 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_weight_is_lambda_times_the_clean_sample_error(prediction_type):
    """diffusion_loss with sigma_data is EDM's lambda(sigma) ||x0_hat - x0||^2 for either prediction type."""
    from ddpm.diffusion import diffusion_loss, sigmas

    stage = make_stage(prediction_type=prediction_type, sigma_data=0.5)
    batch = stage.make_batch(fake_raw(16), torch.Generator().manual_seed(0))
    x0, noise, t = batch["x0"], batch["noise"], batch["timesteps"]
    prediction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = stage.scheduler.add_noise(x0, noise, t)
    x0_hat = torch.stack([predicted_x0(stage.diffusion, p[None], x[None], s)[0] for p, x, s in zip(prediction, x_t, t)])
    sigma = sigmas(stage.diffusion)[t].double()
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam * (x0_hat.double() - x0.double()).pow(2).flatten(1).mean(1)
    loss = diffusion_loss(stage.diffusion, prediction, x0, noise, t)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_clip_denoised_keeps_the_clean_estimate_in_range_and_the_pair_consistent(prediction_type):
    stage = make_stage(prediction_type=prediction_type)
    scheduler = stage.scheduler
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(6, 1, 32, 32, generator=g)
    for t in (999, 500, 20):
        tt = torch.tensor([t] * 6)
        a, b = scheduler.alphas_cumprod[t].sqrt(), (1 - scheduler.alphas_cumprod[t]).sqrt()
        x_t = scheduler.add_noise(x0, noise, tt)
        exact = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, tt)
        # the exact output gives back the clean sample (what the web page's trajectory shows)
        torch.testing.assert_close(predicted_x0(stage.diffusion, exact, x_t, torch.tensor(t)), x0, atol=2e-3, rtol=1e-3)
        # an in-range clean estimate is left alone
        torch.testing.assert_close(clip_denoised(stage.diffusion, exact, x_t, torch.tensor(t)), exact, atol=1e-4, rtol=1e-4)
        # an overshooting one (what guidance does) is clipped, and the output still describes x_t
        wild = exact + 0.5 * torch.randn(exact.shape, generator=g)
        out = clip_denoised(stage.diffusion, wild, x_t, torch.tensor(t))
        eps, x0_hat = ((out, (x_t - b * out) / a) if prediction_type == "epsilon"
                       else (b * x_t + a * out, a * x_t - b * out))
        assert x0_hat.abs().max() <= 1 + 1e-4
        torch.testing.assert_close(a * x0_hat + b * eps, x_t, atol=1e-4, rtol=1e-4)


def test_guidance_interval_guides_only_inside_it():
    stage = make_stage()
    stage.config.sample.guidance_interval = (0, 580)
    model = stage.build_model().eval()
    x = torch.randn(2, 1, 32, 32)
    condition = stage.condition.class_condition(torch.tensor([1, 7]))
    null = stage.condition.null_condition(condition)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    with torch.no_grad():
        inside, outside = (stage.predict(model, x, torch.tensor(t), condition, null, 3.0) for t in (500, 800))
        stage.config.sample.guidance_interval = None
        guided, conditional = (stage.predict(model, x, torch.tensor(t), condition, null, w)
                               for t, w in ((500, 3.0), (800, 1.0)))
    assert calls == [4, 2, 4, 2]  # both CFG branches inside the interval, the conditional one outside
    torch.testing.assert_close(inside, guided)
    torch.testing.assert_close(outside, conditional)
