"""The whole book in one command: every stage's GPU preset trained in dependency order, then
measured, as one Markdown table for benchmarks/RESULTS.md.

    python benchmarks/book.py                        # the GPU presets; runs in runs/book/
    python benchmarks/book.py --only ddpm_fashion autoencoder_fashion latent_fashion
    python benchmarks/book.py --tiny --n 20 --out-dir /tmp/book   # the tiny configs: the chain's test

The chain: stage 1 (pixels); our autoencoder -> latent diffusion on it; our CLIP -> the text stage
on its text tower (offline; the Hub's CLIP stays an override of text_fashion.yaml) -> the three
image-conditioned stages and the two DreamBooth fine-tunes, each starting from that text run. Every
step trains its config with ``python train.py`` (a process of its own), its inputs (``autoencoder.source``,
``text_encoder.source``, ``init_from``) pointed at the runs made before it in ``--out-dir``, prints
its training minutes (from the run's metrics.jsonl) and measures the result with the stage's own
``evaluate`` at the run's sampling settings (DreamBooth: ``conditioning.finetune.dreambooth``'s report,
with the chain's CLIP). A run already finished in ``--out-dir`` is measured, not retrained.
``--tiny`` swaps each preset for its ``configs/*_tiny.yaml`` (seconds a step, not meant to look good).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that the project imports when run as a script

import torch  # noqa: E402

from ddpm.config import read_yaml  # noqa: E402
from ddpm.errors import UserError, cli_errors  # noqa: E402
from ddpm.evaluate import markdown_table  # noqa: E402
from ddpm.plots import training_minutes  # noqa: E402
from ddpm.provenance import provenance  # noqa: E402
from ddpm.runs import load_for_sampling  # noqa: E402

# (run name = its GPU preset in configs/, what the step adds, {config key: the earlier run it needs})
CHAIN = [
    ("ddpm_fashion", "class-conditioned DDPM on pixels", {}),
    ("autoencoder_fashion", "our AutoencoderKL", {}),
    ("latent_fashion", "the same diffusion on its latents", {"autoencoder.source": "autoencoder_fashion"}),
    ("clip_fashion", "our CLIP", {}),
    ("text_fashion", "prompts through our CLIP's text tower",
     {"autoencoder.source": "autoencoder_fashion", "text_encoder.source": "clip_fashion"}),
    ("upscale_fashion", "x4 super-resolution", {"init_from": "text_fashion"}),
    ("inpaint_fashion", "inpainting", {"init_from": "text_fashion"}),
    ("structure_fashion", "structure-to-image", {"init_from": "text_fashion"}),
    ("dreambooth_fashion", "DreamBooth, the whole UNet", {"init_from": "text_fashion"}),
    ("dreambooth_fashion_lora", "DreamBooth, LoRA", {"init_from": "text_fashion"}),
]
# --tiny: the tiny config of each preset, and the overrides that make it that step
TINY = {name: (f"{name}_tiny", []) for name, _, _ in CHAIN}
TINY["dreambooth_fashion_lora"] = ("dreambooth_fashion_tiny", ["lora.rank=4"])
# the numbers each kind of report is summed up by in the table, and how they are printed
HEADLINE = [("accuracy", "judge accuracy {:.3f},"), ("fd", "FD {:.2f}"), ("fd_floor", "(floor {:.2f}),"),
            ("speckle", "speckle {:.2f}"), ("psnr", "PSNR {:.2f} dB"),  # the autoencoder
            ("zero_shot_accuracy_train", "zero-shot {:.3f},"), ("zero_shot_accuracy_unseen", "unseen phrasings {:.3f}"),
            ("psnr/ours", "PSNR {:.2f} dB"), ("psnr/bicubic", "(bicubic {:.2f}),"), ("ssim/ours", "SSIM {:.3f}"),
            ("ssim/bicubic", "(bicubic {:.3f}),"), ("judge_accuracy/ours", "judge accuracy {:.3f}"),
            ("fd/boxes: ours", "FD boxes {:.2f},"), ("fd/strokes: ours", "strokes {:.2f},"),
            ("fd/halves: ours", "halves {:.2f}"),
            ("edge_f1/ours, own class", "edge F1 {:.3f},"), ("judge_accuracy/ours, own class", "judge accuracy {:.3f}")]


def step_command(name: str, out_dir: Path, tiny: bool) -> list[str]:
    """train.py's arguments for one step: its preset (or tiny config) into ``out_dir/name``, its
    inputs the chain's earlier runs there; continuing the run if it was stopped."""
    config, extra = TINY[name] if tiny else (name, [])
    needs = next(n for step, _, n in CHAIN if step == name)
    return ["train.py", f"configs/{config}.yaml", f"train.output_dir={out_dir / name}", *extra,
            *(f"{key}={out_dir / run}" for key, run in needs.items()), "train.resume=latest"]


def train_step(name: str, out_dir: Path, tiny: bool) -> Path:
    """Train a step with train.py, in a process of its own; a finished run is left as it is."""
    run = out_dir / name
    if (run / "final").is_dir():
        print(f"{run}: finished already, measured as it is", file=sys.stderr)
        return run
    command = step_command(name, out_dir, tiny)
    print(f"python {shlex.join(command)}", file=sys.stderr)
    done = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(done.stdout, file=sys.stderr, end="")  # its lines; its progress bar went to stderr
    if done.returncode:
        raise UserError(f"training {name} failed (train.py exit code {done.returncode}; its output is above)")
    return run


def measure(run: Path, out_dir: Path, n: int) -> dict:
    """The stage's own measures of a finished run, at its sampling settings."""
    stage, model, _ = load_for_sampling(run, "cuda" if torch.cuda.is_available() else "cpu")
    if stage.name == "dreambooth":
        from ddpm.runs import load_scorer
        from conditioning.finetune.dreambooth import dreambooth_report, subject_likeness

        likeness = subject_likeness(stage, load_scorer(out_dir / "clip_fashion"))
        return dreambooth_report(stage, model, likeness, n=n, n_classes=n)
    return stage.evaluate(model, n)


def summary(report: dict) -> str:
    """A report's headline numbers, in words (a DreamBooth report: its subject and other classes)."""
    if "judge_subject" in report:
        return (f"subject likeness {report['judge_subject']:.3f} (rest of class {report['judge_rest']:.3f}), "
                f"class prompt -> subject {report['class_prompt_subject_judge']:.3f}, other classes' judge "
                f"accuracy {report['other_classes_accuracy']:.3f}")
    keys = {k.removeprefix("eval_"): v for k, v in report.items()}
    said = [fmt.format(keys[k]) for k, fmt in HEADLINE if isinstance(keys.get(k), (int, float))]
    return " ".join(said).rstrip(",")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/book"), help="where the chain's runs go")
    parser.add_argument("--n", type=int, default=1000, help="images (or test images) each measure uses")
    parser.add_argument("--tiny", action="store_true", help="the tiny configs instead of the GPU presets")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP", choices=[name for name, _, _ in CHAIN],
                        help="these steps only (the runs they need must be in --out-dir already)")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be >= 2 (FD needs two samples)")
    return args


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out_dir = args.out_dir.resolve()  # train.py runs from the repository root
    rows, started = [], time.perf_counter()
    for name, adds, needs in CHAIN:
        if args.only and name not in args.only:
            continue
        missing = [run for run in needs.values() if args.only and not (args.out_dir / run / "final").is_dir()
                   and run not in args.only]
        if missing:
            raise UserError(f"{name} needs the finished run(s) {', '.join(missing)} in {args.out_dir}: "
                            f"leave out --only, or add them to it")
        print(f"== {name}: {adds}", file=sys.stderr)
        run = train_step(name, args.out_dir, args.tiny)
        began = time.perf_counter()
        report = measure(run, args.out_dir, args.n)
        minutes = training_minutes(run)
        print(f"{name}: trained in {minutes:.2f} min; {summary(report)}", file=sys.stderr)
        cfg = read_yaml(run / "config.yaml")["train"]
        budget = f"{cfg.get('max_steps') or str(cfg.get('epochs')) + ' epochs'} x {cfg['batch_size']}"
        rows.append([f"`{name}`", adds, budget, f"{minutes:.2f}", f"{(time.perf_counter() - began) / 60:.2f}",
                     summary(report)])
    print(f"### The whole book\n\n{provenance(['python', 'benchmarks/book.py', *argv])}")
    print(f"runs in {args.out_dir}; measures at n = {args.n}, each run's own sampling settings\n")
    print(markdown_table(["run", "adds", "steps x batch", "train min", "measure min", "measured"], rows))
    total = sum(float(r[3]) for r in rows)
    print(f"\n{total:.2f} minutes of training in all; {(time.perf_counter() - started) / 60:.1f} minutes for the "
          f"whole command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
