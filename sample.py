"""Sample a trained run into a PNG grid (and optionally raw arrays for evaluation).

    python sample.py runs/ddpm_fashion_quick --class 9            # 8 ankle boots
    python sample.py runs/ddpm_fashion_quick --class "ankle boot" --n 16 --guidance 5
    python sample.py runs/ddpm_fashion_quick --class all --steps 50 --scheduler ddim
    python sample.py runs/ddpm_fashion_quick/checkpoints/step-00001000 --class all
    python sample.py runs/ddpm_fashion_quick --evaluate --n 1000       # judge's metrics
    python sample.py runs/ddpm_fashion_quick --sweep 0 1 2 3 5 8       # guidance sweep
    python sample.py runs/latent_fashion_quick --class all              # a latent run: the same
    python sample.py runs/autoencoder_fashion_quick --evaluate --n 10000  # PSNR, judge accuracy

RUN is a run directory (its final model, or else its newest good checkpoint) or one
checkpoint folder inside it; the EMA weights are used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ddpm import evaluate as ev
from ddpm.checkpoint import MANIFEST, latest_good_checkpoint, verify_checkpoint
from ddpm.data import class_index
from ddpm.diffusion import SAMPLERS
from ddpm.errors import UserError
from ddpm.plots import append_metrics, read_metrics, save_grid
from train import load_run

GRID_COLUMNS = 8


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu"):
    """RUN dir or checkpoint folder -> (stage, model in eval mode on ``device``, the folder used)."""
    path = Path(path)
    is_checkpoint = (path / MANIFEST).is_file()  # runs/NAME/checkpoints/step-N
    stage, _, _ = load_run(path.parent.parent if is_checkpoint else path)
    if is_checkpoint:
        verify_checkpoint(path)
        folder = path
    else:
        folder = path / "final"
        if not folder.is_dir():
            folder = latest_good_checkpoint(path / "checkpoints", warn=lambda m: print(m, file=sys.stderr))
            if folder is None:
                raise UserError(f"{path} has neither final/ nor a good checkpoint; train it first")
    model = stage.load_model(folder).to(device).eval()
    return stage, model, folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory or checkpoint folder")
    parser.add_argument("--class", dest="classes", action="append", default=None,
                        help='class index or name ("9", "ankle boot"), or "all"; repeat for several')
    parser.add_argument("--n", type=int, default=None,
                        help="samples per class (default 8); with --evaluate/--sweep: in all (default 1000)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's config)")
    parser.add_argument("--scheduler", choices=list(SAMPLERS), default=None)
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale w: 0 unconditional, 1 conditional")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default: RUN/samples/sample.png)")
    parser.add_argument("--save-array", default=None, metavar="PATH.npy",
                        help="also save the samples (uint8 N x 28 x 28) and PATH_labels.npy")
    parser.add_argument("--evaluate", action="store_true", help="score a balanced set with the judge")
    parser.add_argument("--sweep", type=float, nargs="+", metavar="W", help="evaluate at each guidance scale")
    parser.add_argument("--prompt", dest="prompts", action="append", default=None,
                        help='a text run: one grid row per prompt ("" is unconditional); repeat for several')
    parser.add_argument("--negative-prompt", default="", help="a text run: guide away from this prompt")
    parser.add_argument("--phrasings", choices=["train", "unseen"], default="train",
                        help="a text run with --class/--evaluate/--sweep: prompts from the training "
                             "captions or from phrasings never trained on")
    parser.add_argument("--init-image", default=None, metavar="PNG", help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=0.6,
                        help="img2img: 0 returns the image (through the autoencoder), 1 ignores it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        evaluating = args.evaluate or args.sweep
        args.n = args.n or (1000 if evaluating else 8)
        if args.n <= 0 or (args.steps is not None and args.steps <= 0):
            raise UserError("--n and --steps must be positive")
        init_images = read_image(args.init_image) if args.init_image else None  # fail before loading models
        stage, model, folder = load_for_sampling(args.run, args.device)
        if not hasattr(stage, "generate"):  # an autoencoder run: reconstructions, not samples
            reconstructions(stage, model, folder, args)
            return 0
        is_text = hasattr(stage, "generate_prompts")
        if (args.prompts or args.negative_prompt) and not is_text:
            raise UserError(f"--prompt and --negative-prompt need a text run; {args.run} is a "
                            f"'{stage.name}' run: ask for --class instead")
        if is_text:
            stage.eval_phrasings = args.phrasings
        if evaluating:
            evaluate(stage, model, folder, args)
            return 0
        settings = dict(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                        progress=True)
        if args.init_image:
            if not 0 <= args.strength <= 1:
                raise UserError(f"--strength must be in [0, 1], got {args.strength}")
            settings.update(init_images=init_images, strength=args.strength)
        names = stage.class_names
        if args.prompts:
            rows, labels = args.prompts, torch.full((len(args.prompts) * args.n,), -1)
            prompts = [p for p in rows for _ in range(args.n)]
            images = stage.generate_prompts(model, prompts, negative_prompt=args.negative_prompt,
                                            **_repeat_init(settings, len(prompts)))
        else:
            wanted = args.classes or ["all"]
            classes = list(range(len(names))) if "all" in wanted else [class_index(c, names) for c in wanted]
            rows, labels = [names[c] for c in classes], torch.tensor(classes).repeat_interleave(args.n)
            images = stage.generate(model, labels, **_repeat_init(settings, len(labels)))
        out = Path(args.out) if args.out else _run_dir(folder) / "samples" / f"sample-{folder.name}.png"
        s = stage.config.sample
        title = (f"{folder}: {args.scheduler or s.scheduler}, {args.steps or s.steps} steps, "
                 f"guidance {s.guidance if args.guidance is None else args.guidance:g}, seed {args.seed}")
        if args.negative_prompt:
            title += f", negative prompt {args.negative_prompt!r}"
        if args.init_image:
            title += f", img2img strength {args.strength:g}"
        grid, row_titles = _grid_layout(images, rows, args.n)
        save_grid(grid, out, row_titles, title=title)
        print(f"wrote {out}")
        if args.save_array:
            array_path = Path(args.save_array).with_suffix(".npy")
            array_path.parent.mkdir(parents=True, exist_ok=True)
            np.save(array_path, images.numpy())
            np.save(array_path.with_name(array_path.stem + "_labels.npy"), labels.numpy())
            print(f"wrote {array_path} and its labels")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def reconstructions(stage, model, folder: Path, args) -> None:
    """An autoencoder run: --evaluate prints PSNR and the judge's accuracy on the first n test
    images; otherwise a grid of test images above their reconstructions."""
    if args.evaluate:
        report = stage.evaluate(model, args.n)
        print(f"{folder}: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" if isinstance(v, float)
                                        else f"{k.removeprefix('eval_')} {v}" for k, v in report.items()))
        append_metrics(_run_dir(folder) / "metrics.jsonl", {"step": _model_step(folder), **report})
        return
    out = Path(args.out) if args.out else _run_dir(folder) / "samples" / f"reconstructions-{folder.name}.png"
    print(f"wrote {stage.preview(model, out, title=f'{folder}: test images and reconstructions')}")


def evaluate(stage, model, folder: Path, args) -> None:
    """--evaluate: one row of metrics, appended to the run's metrics.jsonl; --sweep: a table,
    a trade-off plot and a same-seed grid per guidance scale."""
    run_dir = _run_dir(folder)
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    settings = dict(scheduler=args.scheduler, steps=args.steps, seed=args.seed)
    scales = args.sweep or [args.guidance]
    reports = [ev.evaluate_model(stage, model, args.n, guidance=w, progress=True, **settings) for w in scales]
    print(f"{folder} (n = {args.n}; FD floor = real train vs real test at the same n)")
    print(ev.format_table(reports))
    if args.sweep:
        name = "sweep_unseen" if getattr(stage, "eval_phrasings", "train") == "unseen" else "sweep"
        paths = [out_dir / f"{name}.json", out_dir / f"{name}.png", out_dir / f"{name}_grid.png"]
        paths[0].write_text(json.dumps(reports, indent=1))
        ev.plot_sweep(reports, paths[1])
        ev.sweep_grid(stage, model, args.sweep, paths[2], **settings)
        print(f"wrote {', '.join(map(str, paths))}")
        return
    report = reports[0]
    print(ev.format_per_class(report, stage.class_names))
    png = out_dir / f"per_class_w{report['guidance']:g}.png"
    ev.plot_per_class(report, stage.class_names, png)
    append_metrics(run_dir / "metrics.jsonl", {"step": _model_step(folder), **ev.as_metrics(report)})
    print(f"wrote {png}; appended to {run_dir / 'metrics.jsonl'}")


def _run_dir(folder: Path) -> Path:
    return folder.parent if folder.name == "final" else folder.parent.parent


def _model_step(folder: Path) -> int:
    """The optimizer step the weights in ``folder`` come from."""
    if folder.name != "final":
        return json.loads((folder / "trainer_state.json").read_text())["step"]
    return max((r["step"] for r in read_metrics(folder.parent / "metrics.jsonl")), default=0)


def read_image(path: str) -> torch.Tensor:
    """An image file -> uint8 1 x 28 x 28 grayscale (resized if it is another size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("L")
    except FileNotFoundError:
        raise UserError(f"--init-image {path} does not exist") from None
    except (UnidentifiedImageError, OSError):
        raise UserError(f"--init-image {path} is not an image file PIL can read") from None
    if image.size != (28, 28):
        image = image.resize((28, 28), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy())[None]


def _repeat_init(settings: dict, n: int) -> dict:
    """The one init image, once per sample."""
    if "init_images" not in settings:
        return settings
    return {**settings, "init_images": settings["init_images"].expand(n, -1, -1)}


def _grid_layout(images: torch.Tensor, row_names: list[str], n: int):
    """N x 28 x 28 (n per row name, in order) -> R x C x 28 x 28 with rows of at most 8, and row titles."""
    cols = min(n, GRID_COLUMNS)
    rows_per_class = math.ceil(n / cols)
    grid = torch.zeros(len(row_names) * rows_per_class, cols, 28, 28, dtype=torch.uint8)
    titles = []
    for i, name in enumerate(row_names):
        block = images[i * n : (i + 1) * n]
        for r in range(rows_per_class):
            row = block[r * cols : (r + 1) * cols]
            grid[i * rows_per_class + r, : len(row)] = row
            titles.append(name if r == 0 else "")
    return grid, titles


if __name__ == "__main__":
    sys.exit(main())
