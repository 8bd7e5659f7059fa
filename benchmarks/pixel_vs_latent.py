"""Pixel against latent diffusion: compute per training image, speed, and quality per minute.

    python benchmarks/pixel_vs_latent.py runs/ddpm_fashion_quick runs/latent_fashion_quick
    python benchmarks/pixel_vs_latent.py RUN_A RUN_B --n 1000 --guidance 3 --timed-steps 20
    python benchmarks/pixel_vs_latent.py configs/ddpm_fashion_quick.yaml runs/latent_fashion_quick

For each finished run (any stage 1 or stage 2 run, typically the two quick presets), or a config
not trained yet (then only its cost: FLOPs, images/s and the minutes they imply):
  FLOPs / image    model FLOPs of one training step per image (forward and backward of the UNet,
                   ``torch.utils.flop_counter``); for a latent run the autoencoder is not in the
                   step: its encoder ran once, to build the latent cache;
  images/s         training steps timed here and now, the two runs' models alternating so that
                   the ratio is fair on a shared machine (eager fp32 forward, backward, AdamW);
  minutes at that  the preset's steps x batch at those images/s: the two presets' training
                   times on one machine, from one measurement;
  train minutes    the run's own training time, summed over its logged windows (checkpoints,
                   previews and evaluation not counted); for a latent run, also the minutes of
                   the autoencoder run it used, which is trained once and reused;
  accuracy, FD     the judge's scores of n samples of the final EMA model at the given
                   guidance (``sample.py --evaluate``), and the time sampling them took.
The output is Markdown, to paste into benchmarks/RESULTS.md as it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `ddpm` imports when run as a script

import torch  # noqa: E402

from ddpm import evaluate as ev  # noqa: E402
from ddpm.config import read_yaml  # noqa: E402
from ddpm.errors import cli_errors  # noqa: E402
from ddpm.flops import training_flops  # noqa: E402
from ddpm.plots import read_metrics  # noqa: E402
from ddpm.provenance import provenance  # noqa: E402
from ddpm.runs import load_config, load_for_sampling, load_run  # noqa: E402


def training_minutes(run_dir: Path, batch_size: int) -> float:
    """Minutes of training a run logged: each window's steps x batch / its images per second."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "images_per_s" in r]
    seconds, last_step = 0.0, 0
    for r in records:
        seconds += (r["step"] - last_step) * batch_size / r["images_per_s"]
        last_step = r["step"]
    return seconds / 60


def time_training_steps(runs: list[dict], steps: int) -> None:
    """Fill in run["images_per_s"]: ``steps`` timed AdamW steps per model after 2 untimed ones,
    the models taking turns one step at a time."""
    for run in runs:
        model = run["stage"].build_model().train()
        data = {k: v[: run["batch_size"]] for k, v in run["data"].items()}
        batch = run["stage"].make_batch(data, torch.Generator().manual_seed(0))
        run.update(model=model, batch=batch, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), seconds=0.0)
    for i in range(steps + 2):
        for run in runs:
            start = time.perf_counter()
            run["stage"].loss(run["model"], run["batch"]).backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            if i >= 2:
                run["seconds"] += time.perf_counter() - start
    for run in runs:
        run["images_per_s"] = steps * run["batch_size"] / run.pop("seconds")
        del run["model"], run["batch"], run["optimizer"]


def measure(run_dir: Path, n: int, guidance: float) -> dict:
    """One row: a finished run's cost and quality, or (``run_dir`` a YAML config) its cost only."""
    trained = run_dir.is_dir()
    stage, cfg, _ = load_run(run_dir) if trained else load_config(read_yaml(run_dir))
    data = stage.load_data()
    params, flops = training_flops(stage, data, torch.device("cpu"), min(cfg.batch_size, 32))
    row = {"run": run_dir, "stage": stage, "batch_size": cfg.batch_size, "data": data, "params": params,
           "flops": flops, "shape": "x".join(map(str, stage.space.sample_shape)),
           "steps": cfg.total_steps(len(next(iter(data.values())))),
           "minutes": training_minutes(run_dir, cfg.batch_size) if trained else None}
    if not trained:
        return row
    if stage.name == "latent":
        source = Path(stage.config.autoencoder.source)
        if (source / "config.yaml").is_file():
            _, ae_cfg, _ = load_run(source)
            row["autoencoder_minutes"] = training_minutes(source, ae_cfg.batch_size)
    print(f"{run_dir}: evaluating n = {n} at guidance {guidance}", file=sys.stderr)
    _, model, _ = load_for_sampling(run_dir)
    start = time.perf_counter()
    report = ev.evaluate_model(stage, model, n, guidance=guidance, progress=True)
    row.update(report=report, sample_seconds=time.perf_counter() - start)
    return row


def format_report(argv: list[str], rows: list[dict], timed_steps: int) -> str:
    lines = ["### Pixel vs latent", "", provenance(["python", "benchmarks/pixel_vs_latent.py", *argv]),
             f"images/s from {timed_steps} alternating training steps per model in this run", "",
             "| run | denoises | params | GFLOPs / train image | train images/s | steps x batch | "
             "min at these images/s | run's own train min | + autoencoder min | accuracy | FD (floor) | "
             "sampling s / 1000 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rep = r.get("report")
        at_this_speed = r["steps"] * r["batch_size"] / r["images_per_s"] / 60
        own = f"{r['minutes']:.1f}" if r["minutes"] is not None else "-"
        ae = f"{r['autoencoder_minutes']:.1f}" if "autoencoder_minutes" in r else "-"
        quality = (f"{rep['accuracy']:.3f} | {rep['fd']:.1f} ({rep['fd_floor']:.1f}) | "
                   f"{r['sample_seconds'] * 1000 / rep['n']:.0f}") if rep else "- | - | -"
        lines.append(f"| `{r['run']}` | {r['shape']} | {r['params'] / 1e6:.2f}M | {r['flops'] / 1e9:.3f} | "
                     f"{r['images_per_s']:.0f} | {r['steps']} x {r['batch_size']} | {at_this_speed:.1f} | {own} | "
                     f"{ae} | {quality} |")
    a, b = rows[0], rows[-1]
    lines += ["", f"Ratios {Path(b['run']).stem} / {Path(a['run']).stem}: FLOPs per training image "
              f"{b['flops'] / a['flops']:.3f}, training images/s {b['images_per_s'] / a['images_per_s']:.2f}."]
    scored = [r["report"] for r in rows if "report" in r]
    if scored:
        lines[-1] += (f" Sampling: {scored[0]['scheduler']}-{scored[0]['steps']}, guidance "
                      f"{scored[0]['guidance']:g}, n = {scored[0]['n']}.")
    return "\n".join(lines)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished run directories or configs (pixel first, then latent)")
    parser.add_argument("--n", type=int, default=1000, help="samples for the judge (default 1000)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--timed-steps", type=int, default=20)
    args = parser.parse_args(argv)
    rows = [measure(Path(r), args.n, args.guidance) for r in args.runs]
    time_training_steps(rows, args.timed_steps)
    print(format_report(argv, rows, args.timed_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
