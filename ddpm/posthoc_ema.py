"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3): choose the length of the weight average *after* training, by the judge.

During training two power-function EMAs of the weights are kept (``train.posthoc_ema``, their
relative widths sigma_rel, e.g. 0.05 and 0.10; ``ddpm.ema.PowerEMA``) and both are written every
``train.posthoc_every`` steps to ``RUN/posthoc/step-N.safetensors``. A power-function EMA at step t
averages the weights of steps tau <= t with the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)            (eq. 2: decay (1 - 1/t)^(gamma + 1))

whose width relative to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 3). A run
that already knows its length trains one such EMA as its model (``train.ema_sigma_rel``).
Each snapshot is a weighted average of past weights, so a new profile p (any sigma_rel, any step)
is approximated by a linear combination of the snapshots' profiles, sum_i x_i p_i, with x the
least-squares solution of A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p> (the inner product of two
profiles has a closed form, ``profile_overlap``); the same combination of the snapshots' weights
gives the new EMA's weights.

    python -m ddpm.posthoc_ema runs/ddpm_fashion_quick --sigma-rel 0.03 0.05 0.08 0.12 0.2 --n 1000
    python -m ddpm.posthoc_ema runs/ddpm_fashion_quick --sigma-rel 0.08 --save

The first scores each length with the judge (at the run's ``sample`` settings); ``--save`` writes the
reconstructed weights as the run's model, ``final/unet/`` (the trainer's own EMA stays in the last
checkpoint's ``ema/``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .checkpoint import checkpoint_name, load_tensors, save_tensors, tensor_names
from .ema import PowerEMA, gamma_of
from .errors import UserError, cli_errors

SNAPSHOTS = "posthoc"


def profile_tensors(profiles: list[PowerEMA]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every profile's weights in one safetensors dict ("sigma_rel/name" keys) and its metadata."""
    tensors = {f"{p.sigma_rel:g}/{k}": v for p in profiles for k, v in p.model.state_dict().items()}
    return tensors, {"step": str(profiles[0].step), "sigma_rels": json.dumps([p.sigma_rel for p in profiles])}


def split_profiles(tensors: dict[str, torch.Tensor]) -> dict[float, dict[str, torch.Tensor]]:
    """A ``profile_tensors`` dict back into one state dict per width: {sigma_rel: state dict}."""
    split: dict[float, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        width, name = key.split("/", 1)
        split.setdefault(float(width), {})[name] = value
    return split


def load_profiles(profiles: list[PowerEMA], path: Path, step: int) -> None:
    """Restore the profiles' weights (``profile_tensors``' file) and their step, on resume."""
    saved = split_profiles(load_tensors(path, next(profiles[0].model.parameters()).device))
    for p in profiles:
        p.model.load_state_dict(saved[float(f"{p.sigma_rel:g}")])
        p.step = step


def write_snapshot(run_dir: Path, profiles: list[PowerEMA]) -> Path:
    """``RUN/posthoc/step-N.safetensors``: the profiles' weights at step N."""
    folder = run_dir / SNAPSHOTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{checkpoint_name(profiles[0].step)}.safetensors"
    tensors, metadata = profile_tensors(profiles)
    save_tensors(tensors, path, metadata)
    return path


# -- after training: a new profile from the snapshots ----------------------------------------


def profile_overlap(t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor
                    ) -> torch.Tensor:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over 0 <= tau <= min(t_a, t_b), elementwise (broadcast):

        (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (m/t_a)^(gamma_a+1) (m/t_b)^(gamma_b+1) / m

    with m = min(t_a, t_b), written with ratios <= 1 so that large gammas do not overflow."""
    m = torch.minimum(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m)


def snapshot_coefficients(steps: list[int], gammas: list[float], step: int, gamma: float) -> torch.Tensor:
    """x (float64, one per snapshot) such that sum_i x_i p_i is the least-squares fit of the profile
    (``step``, ``gamma``) by the snapshots' profiles (``steps[i]``, ``gammas[i]``)."""
    t, g = torch.tensor(steps, dtype=torch.float64), torch.tensor(gammas, dtype=torch.float64)
    a = profile_overlap(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_overlap(t, g, torch.tensor(float(step), dtype=torch.float64), torch.tensor(gamma, dtype=torch.float64))
    return torch.linalg.lstsq(a, b[:, None]).solution[:, 0]


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot of a run, in step order."""
    found = [(int(m.group(1)), p) for p in (run_dir / SNAPSHOTS).glob("step-*.safetensors")
             if (m := re.fullmatch(r"step-(\d+)\.safetensors", p.name))]
    if not found:
        raise UserError(f"{run_dir} has no post-hoc EMA snapshots ({SNAPSHOTS}/step-N.safetensors); train it with "
                        f"train.posthoc_ema=[0.05,0.1] train.posthoc_every=100")
    return sorted(found)


def reconstruct(run_dir: Path, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of a power-function EMA of width ``sigma_rel`` at ``step`` (default: the last
    snapshot's), from the run's snapshots up to that step."""
    snapshots = list_snapshots(run_dir)
    step = snapshots[-1][0] if step is None else step
    used = [(s, path) for s, path in snapshots if s <= step]
    if not used:
        raise UserError(f"{run_dir} has no snapshot at or before step {step}; the first is at {snapshots[0][0]}")
    profiles = [(s, width) for s, path in used for width in snapshot_widths(path)]
    x = snapshot_coefficients([s for s, _ in profiles], [gamma_of(w) for _, w in profiles], step, gamma_of(sigma_rel))
    coefficient = dict(zip(profiles, x.tolist()))
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for s, path in used:  # one snapshot in memory at a time
        for width, state in split_profiles(load_tensors(path)).items():
            for k, v in state.items():
                total[k] = total.get(k, 0) + coefficient[s, width] * v.double()
                dtypes[k] = v.dtype
    return {k: v.to(dtypes[k]) for k, v in total.items()}


def snapshot_widths(path: Path) -> list[float]:
    """The sigma_rels a snapshot holds, read from its tensor names without loading them."""
    return sorted({float(name.split("/", 1)[0]) for name in tensor_names(path)})


def load_average(model: torch.nn.Module, weights: dict[str, torch.Tensor], run_dir: Path) -> None:
    """A rebuilt average into the run's saved network; a UserError if the snapshots hold other tensors."""
    differ = sorted(set(weights) ^ set(model.state_dict()))
    if differ:
        raise UserError(f"{run_dir}'s snapshots and its saved network differ in {differ[:2]}: post-hoc EMA rebuilds "
                        f"a network that trained alone (not, e.g., DreamBooth's subject.learn_identifier)")
    model.load_state_dict(weights)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ddpm.posthoc_ema", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory trained with train.posthoc_ema")
    parser.add_argument("--sigma-rel", type=float, nargs="+", required=True, metavar="S",
                        help="EMA widths to score (or, with --save, the one to keep)")
    parser.add_argument("--step", type=int, default=None, help="the EMA at this step (default: the last snapshot)")
    parser.add_argument("--n", type=int, default=1000, help="samples per score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", action="store_true", help="write the one --sigma-rel as the run's final/unet")
    return parser.parse_args(argv)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    from .evaluate import evaluate_model
    from .provenance import provenance
    from .runs import load_for_sampling

    args = parse_args(argv)
    run_dir = Path(args.run)
    stage, model, _ = load_for_sampling(run_dir)
    if args.save:
        if len(args.sigma_rel) != 1:
            raise UserError("--save keeps one EMA: give one --sigma-rel")
        load_average(model, reconstruct(run_dir, args.sigma_rel[0], args.step), run_dir)
        stage.save_final(model, run_dir / "final")
        (run_dir / "final" / "posthoc_ema.json").write_text(
            json.dumps({"sigma_rel": args.sigma_rel[0], "step": args.step or list_snapshots(run_dir)[-1][0]}))
        print(f"{run_dir / 'final'} now holds the post-hoc EMA of width {args.sigma_rel[0]:g}")
        return 0
    if not stage.capabilities.evaluates:
        raise UserError(f"a '{stage.name}' run has no judge to choose its EMA by")
    print(provenance(["python", "-m", "ddpm.posthoc_ema", *(sys.argv[1:] if argv is None else argv)]))
    print(f"{'sigma_rel':>9} {'accuracy':>9} {'FD':>8} {'floor':>7} {'diversity':>10} {'speckle':>8}")
    for sigma_rel in args.sigma_rel:
        load_average(model, reconstruct(run_dir, sigma_rel, args.step), run_dir)
        r = evaluate_model(stage, model, args.n, seed=args.seed)
        print(f"{sigma_rel:>9g} {r['accuracy']:>9.3f} {r['fd']:>8.3f} {r['fd_floor']:>7.3f} {r['diversity']:>10.3f} "
              f"{r['speckle']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
