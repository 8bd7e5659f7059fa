"""Post-hoc EMA (ddpm/posthoc_ema.py): the power-function EMA and its reconstruction from snapshots."""

import shutil

import pytest
import torch

from ddpm.errors import UserError
from ddpm.ema import PowerEMA, gamma_of
from ddpm.posthoc_ema import list_snapshots, reconstruct, write_snapshot


@pytest.mark.parametrize("sigma_rel,gamma", [(0.05, 16.97), (0.10, 6.94)])  # EDM2's two profiles
def test_gamma_of_sigma_rel(sigma_rel, gamma):
    g = gamma_of(sigma_rel)
    assert abs(g - gamma) < 0.01
    assert abs(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 - sigma_rel) < 1e-9


def test_power_ema_averages_with_its_profile():
    """After t steps of weights w_1..w_t the EMA is sum_tau p_t(tau) w_tau, p_t(tau) ~ tau^gamma (discretely:
    the weights (1 - 1/t)^(gamma+1) products give exactly prod_{s>tau} beta_s (1 - beta_tau))."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = PowerEMA(model, 0.1)
    seen = []
    for t in range(1, 201):
        model.weight.data.fill_(float(t))
        seen.append(float(t))
        ema.update(model)
    betas = [(1 - 1 / s) ** (ema.gamma + 1) for s in range(1, 201)]
    weights = [(1 - betas[i]) * torch.tensor(betas[i + 1:]).prod().item() for i in range(200)]
    assert abs(sum(weights) - 1) < 1e-6
    assert abs(ema.model.weight.item() - sum(w * v for w, v in zip(weights, seen))) < 1e-3
    # the profile's mean is t (gamma + 1) / (gamma + 2) for a continuous power law: 0.89 t at gamma 6.94
    assert abs(ema.model.weight.item() / 200 - (ema.gamma + 1) / (ema.gamma + 2)) < 0.01


def test_reconstruction_matches_a_profile_it_never_tracked(tmp_path):
    """Snapshots of the 0.05 and 0.10 profiles every 10 steps rebuild the 0.07 profile, at the end and at an
    earlier snapshot's step, to within 1% of the difference between the two tracked profiles (measured: 0.01%
    and 0.03%)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    tracked = [PowerEMA(model, 0.05), PowerEMA(model, 0.1)]
    target, early = PowerEMA(model, 0.07), PowerEMA(model, 0.07)
    walk = [p.detach().clone() for p in model.parameters()]
    for t in range(1, 401):
        for p, w in zip(model.parameters(), walk):
            w += 0.05 * torch.randn_like(w)
            p.data.copy_(w + 0.02 * t / 400)
        for average in [*tracked, target, *([early] if t <= 250 else [])]:
            average.update(model)
        if t % 10 == 0:
            write_snapshot(tmp_path, tracked)
    spread = torch.stack([tracked[0].model.weight, tracked[1].model.weight]).std(0).mean().item()
    for sigma_rel, step, truth in [(0.07, None, target), (0.07, 250, early)]:
        rebuilt = reconstruct(tmp_path, sigma_rel, step)
        error = (rebuilt["weight"] - truth.model.weight).abs().mean().item()
        assert error < 0.01 * spread + 1e-4, f"sigma_rel {sigma_rel}: error {error:.5f}, spread {spread:.5f}"


def test_no_snapshots_is_one_line_that_says_how_to_get_them(tmp_path):
    with pytest.raises(UserError, match="train.posthoc_ema"):
        list_snapshots(tmp_path)


def test_cli_scores_lengths_and_saves_the_chosen_one(trained_tiny_run, tmp_path, capsys):
    """python -m ddpm.posthoc_ema RUN --sigma-rel ...: one judged row per width; --save makes the chosen
    EMA the run's final/unet, which sample.py then loads."""
    from ddpm.posthoc_ema import main
    from ddpm.runs import load_for_sampling

    assert main([str(trained_tiny_run), "--sigma-rel", "0.05", "0.2", "--n", "10"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    rows = [r for r in rows if r and r[0] in ("0.05", "0.2")]
    assert [r[0] for r in rows] == ["0.05", "0.2"] and all(0 <= float(r[1]) <= 1 for r in rows)
    run = tmp_path / "run"
    shutil.copytree(trained_tiny_run, run)
    assert main([str(run), "--sigma-rel", "0.2", "--save"]) == 0
    _, model, _ = load_for_sampling(run)
    expected = reconstruct(run, 0.2)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_autoguidance_loads_its_weak_model_or_says_what_is_missing(trained_tiny_run):
    from ddpm.runs import load_for_sampling

    stage, model, _ = load_for_sampling(trained_tiny_run, overrides=["sample.guide_with=checkpoints/step-00000004"])
    assert stage.guide_model is not None
    weak = dict(stage.guide_model.named_parameters())
    assert any(not torch.equal(p, weak[k]) for k, p in model.named_parameters()), "the guide is the model itself"
    images = stage.generate(model, torch.arange(3), steps=2)
    assert images.shape == (3, 28, 28) and images.dtype == torch.uint8
    with pytest.raises(UserError, match="sample.guide_with=checkpoints/step-00000003: .* holds no model"):
        load_for_sampling(trained_tiny_run, overrides=["sample.guide_with=checkpoints/step-00000003"])


def test_a_run_whose_model_is_more_than_its_network_is_one_line(trained_tiny_text_run, tmp_path, capsys):
    import train
    from ddpm.posthoc_ema import main

    from .conftest import dreambooth_config

    learnt = train.train(dreambooth_config(tmp_path / "db", trained_tiny_text_run, subject={"learn_identifier": True},
                                           train={"posthoc_ema": [0.05, 0.1], "posthoc_every": 3}))
    capsys.readouterr()
    for args in (["--save"], ["--n", "4"]):
        assert main([str(learnt), "--sigma-rel", "0.05", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "differ in ['identifier_embedding']" in err, err
