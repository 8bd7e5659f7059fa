"""Sampling speed against quality: every sampler at its usual and at fewer steps, on one trained run.

    python benchmarks/sample_speed.py runs/ddpm_fashion                          # GPU, n = 1000
    python benchmarks/sample_speed.py runs/ddpm_fashion_quick --samplers ddim dpm++ --device cpu
    python benchmarks/sample_speed.py runs/ddpm_fashion_tiny --n 20 --samplers ddim-2 --device cpu

For each sampler, n class-balanced images are generated at the run's guidance scale (both CFG
branches in one batch of 2B, ``--batch-size`` images at a time, bf16 autocast on GPUs), and
the generation alone is timed: images/s. The same images are then scored by the judge, as
``sample.py --evaluate`` does (same labels, same seed, so the same numbers at the default
batch size): class accuracy, Fréchet distance beside its floor (the FD of n real images),
within-class diversity and speckle (isolated pixels per image; real test images: 0.23).
A sampler is ``NAME`` (ddpm, ddim, dpm++, euler: the step count from the table below) or
``NAME-STEPS``, e.g. ``ddim-10``. The output is Markdown, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `ddpm` imports when run as a script

import torch  # noqa: E402

from ddpm.diffusion import SAMPLERS  # noqa: E402
from ddpm.errors import UserError, cli_errors  # noqa: E402
from ddpm.evaluate import balanced_labels, cached_judge  # noqa: E402
from ddpm.metrics import judge_report, real_floor, reference_stats  # noqa: E402
from ddpm.provenance import provenance  # noqa: E402
from ddpm.runs import load_for_sampling  # noqa: E402

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "dpm++": 20, "euler": 50}
DEFAULT_SAMPLERS = ["ddpm-1000", "ddim-50", "ddim-20", "ddim-10", "dpm++-20", "dpm++-10", "euler-50", "euler-20"]


def parse_sampler(spec: str) -> tuple[str, int]:
    """"ddim" -> ("ddim", 50); "dpm++-20" -> ("dpm++", 20)."""
    name, dash, steps = spec.rpartition("-")
    if not (dash and steps.isdigit()):
        name, steps = spec, ""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {spec!r}; valid: {', '.join(SAMPLERS)}, optionally NAME-STEPS")
    steps = int(steps) if steps else DEFAULT_STEPS[name]
    if steps <= 0:
        raise UserError(f"sampler {spec!r}: steps must be > 0")
    return name, steps


def time_generation(stage, model, labels: torch.Tensor, name: str, steps: int, guidance: float,
                    batch_size: int) -> tuple[torch.Tensor, float, float]:
    """Generate one image per label (int64 N); returns (uint8 N x 28 x 28 on the CPU, seconds,
    network evaluations per image, counted as the images that went through the network).

    ``generate`` copies each batch to the CPU, which waits for the device: the clock is honest.
    """
    through = []
    hook = model.register_forward_hook(lambda module, args, output: through.append(len(args[0])))
    try:
        start = time.perf_counter()
        images = stage.generate(model, labels, scheduler=name, steps=steps, guidance=guidance, seed=0,
                                batch_size=batch_size)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    return images, seconds, sum(through) / len(labels)


def load_judge_now() -> None:
    """Load the judge and embed the test set now, so that a missing judge fails before any sampling."""
    try:
        reference_stats(cached_judge())
    except UserError as e:
        raise UserError(f"{e}; or pass --no-score to time the samplers without scoring") from None


def score(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The judge's accuracy, FD and diversity of generated images, and the FD floor at the same n."""
    judge = cached_judge()
    report = judge_report(images, labels, judge, reference_stats(judge))
    return {"accuracy": report["accuracy"], "fd": report["fd"], "fd_floor": real_floor(judge, len(labels)),
            "diversity": report["diversity"], "speckle": report["speckle"]}


def benchmark(stage, model, samplers: list[tuple[str, int]], n: int, guidance: float, batch_size: int,
              scored: bool = True) -> list[dict]:
    """One row per (name, steps) sampler: its images/s and, if ``scored``, the judge's numbers."""
    labels = balanced_labels(n, len(stage.class_names)).sort().values  # as evaluate_model does
    # Warm-up: the first call on a GPU pays for kernel selection and memory allocation.
    stage.generate(model, labels[:batch_size], scheduler="ddim", steps=2, guidance=guidance)
    rows = []
    for name, steps in samplers:
        images, seconds, evals = time_generation(stage, model, labels, name, steps, guidance, batch_size)
        print(f"{name}-{steps}: {seconds:.1f} s", file=sys.stderr)
        quality = score(images, labels) if scored else {}
        rows.append({"sampler": f"{name}-{steps}", "evals": evals, "images_per_s": n / seconds,
                     "seconds": seconds, **quality})
    return rows


def format_report(argv: list[str], folder: Path, args, guidance: float, rows: list[dict]) -> str:
    """The header (command, date, device, versions, settings) and a Markdown table."""
    precision = "bf16 autocast" if args.device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    lines = [
        f"### sample_speed: {folder}",
        "",
        provenance(["python", "benchmarks/sample_speed.py", *argv], args.device),
        f"precision: {precision}  ",
        f"n = {args.n} per sampler, guidance {guidance:g}, batches of {args.batch_size} "
        f"(x2 through the network with CFG); time = generation only, judge scoring not timed",
        "",
        "| sampler | network evals/image | images/s | seconds | accuracy | FD | FD floor | diversity | speckle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        quality = [f"{r[k]:.3f}" if k in r else "n/a" for k in ("accuracy", "fd", "fd_floor", "diversity", "speckle")]
        lines.append(f"| {r['sampler']} | {r['evals']:g} | {r['images_per_s']:,.1f} | {r['seconds']:.2f} | "
                     + " | ".join(quality) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory (its final model) or a checkpoint folder")
    parser.add_argument("--n", type=int, default=1000, help="images per sampler, balanced over the classes")
    parser.add_argument("--samplers", nargs="+", default=None, metavar="NAME[-STEPS]",
                        help=f"default: {' '.join(DEFAULT_SAMPLERS)} (on a CPU without ddpm-1000: hours)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per generate batch")
    parser.add_argument("--no-score", action="store_true", help="time only; skip the judge")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.n < 2 or args.batch_size <= 0:
        parser.error("--n must be >= 2 (FD needs two samples) and --batch-size > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    if args.samplers is None:
        args.samplers = [s for s in DEFAULT_SAMPLERS if args.device == "cuda" or s != "ddpm-1000"]
    return args


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    samplers = [parse_sampler(s) for s in args.samplers]
    stage, model, folder = load_for_sampling(args.run, args.device)
    guidance = stage.sampling_settings(guidance=args.guidance)["guidance"]
    if not args.no_score:
        load_judge_now()
    rows = benchmark(stage, model, samplers, args.n, guidance, args.batch_size, scored=not args.no_score)
    print(format_report(argv, folder, args, guidance, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
