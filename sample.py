"""Sample a trained run into a PNG grid (and optionally raw arrays for evaluation).

    python sample.py runs/ddpm_fashion_quick --class 9            # 8 ankle boots
    python sample.py runs/ddpm_fashion_quick --class "ankle boot" --n 16 --guidance 5
    python sample.py runs/ddpm_fashion_quick --class all --steps 50 --scheduler ddim
    python sample.py runs/ddpm_fashion_quick/checkpoints/step-00003000 --class all
    python sample.py runs/ddpm_fashion_quick --evaluate --n 1000       # judge's metrics
    python sample.py runs/ddpm_fashion_quick --sweep 0 1 2 3 5 8       # guidance sweep
    python sample.py runs/latent_fashion_quick --class all              # a latent run: the same
    python sample.py runs/autoencoder_fashion_quick --evaluate --n 10000  # PSNR, judge accuracy, reconstruction FD
    python sample.py runs/clip_fashion_quick --evaluate --n 10000         # zero-shot accuracy, recall
    python sample.py runs/text_fashion_clip_quick --evaluate --clip runs/clip_fashion_quick   # + CLIP score
    python sample.py runs/text_fashion_clip_quick --class all --n 8 --rank 2 --clip runs/clip_fashion_quick
    python sample.py runs/ddpm_fashion_quick --web                      # a page at http://127.0.0.1:7860
    python sample.py runs/text_fashion_clip_quick --lora runs/dreambooth_fashion_lora_quick/final \
        --prompt "a photo of a <|spare_0|> bag"                         # a text run with LoRA adapters
    python sample.py runs/upscale_fashion_quick --low-res conditioning/examples/small.png \
        --prompt "a sneaker"                                            # x4 super-resolution
    python sample.py runs/inpaint_fashion_quick --init-image conditioning/examples/shirt.png \
        --mask conditioning/examples/hole.png --prompt "a shirt"
    python sample.py runs/structure_fashion_quick --structure conditioning/examples/shirt.png --prompt "a dress"
    python sample.py runs/inpaint_fashion_quick --evaluate --n 1000     # an image-conditioned run's measures

RUN is a run directory (its final model, or else its newest good checkpoint) or one
checkpoint folder inside it; the EMA weights are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ddpm import evaluate as ev
from ddpm.contract import CLASS
from ddpm.data import FASHION_MNIST, LabelledImages, read_image
from ddpm.diffusion import SAMPLERS
from ddpm.errors import UserError, cli_errors
from ddpm.judge import accuracy
from ddpm.plots import append_metrics, rows_of, save_grid
from ddpm.provenance import provenance
from ddpm.run_folder import model_step, run_dir_of
from ddpm.request import check_request, read_inputs
from ddpm.runs import load_for_sampling, load_scorer, stage_declarations
from ddpm.web import MAX_IMAGE_STEPS, MAX_UPLOAD_MB, MAX_WAITING, serve


def parse_args(argv: list[str] | None, declared: dict, kinds: dict) -> argparse.Namespace:
    """The command line; ``declared``: the input images stages declare, ``kinds``: what they can be asked
    for (``stage_declarations``), a flag each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory or checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="change how the run samples, as train.py takes them (right after RUN): "
                             "sample.guidance_interval=null, sample.clip_denoised=false, "
                             "sample.guide_with=checkpoints/step-00000900 (autoguidance), upscale.noise_level=50, "
                             "inpaint.keep_known=false")
    for kind, stages in kinds.values():
        parser.add_argument(f"--{kind.name}", dest=kind.name, action="append", default=None,
                            help=f"{kind.help} (a run of: {', '.join(stages)})")
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
    parser.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                        help="one row that composes the --prompt's, each pulling with its weight "
                             "(negative: pushing away), e.g. --prompt 'a dark coat' --prompt 'a small coat' "
                             "--weights 1 1")
    parser.add_argument("--negative-prompt", default="", help="a run that takes prompts: guide away from this prompt")
    parser.add_argument("--phrasings", choices=["train", "unseen"], default="train",
                        help="a run that takes prompts, with --class/--evaluate/--sweep: prompts from the training "
                             "captions or from phrasings never trained on")
    parser.add_argument("--attributes", action="store_true",
                        help="with --evaluate/--sweep: also measure attribute adherence "
                             "('a dark coat' -> dark coats?), on held-out pairs, and composition")
    parser.add_argument("--clip", default=None, metavar="CLIP_RUN",
                        help="a run that scores images against text (configs/clip_fashion_quick.yaml): CLIP score in "
                             "--evaluate/--sweep, and rank candidates with --rank")
    parser.add_argument("--rank", type=int, default=None, metavar="K",
                        help="generate --n candidates per row and keep the K that --clip scores highest")
    parser.add_argument("--lora", default=None, metavar="FOLDER",
                        help="a run that takes adapters: add these LoRA adapters (diffusers' format) to its UNet")
    parser.add_argument("--init-image", default=None, metavar="PNG", help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=0.6,
                        help="img2img: 0 returns the image (through the autoencoder), 1 ignores it")
    for item, stages in declared.values():
        parser.add_argument(item.flag, dest=item.name, default=None, metavar="PNG",
                            help=f"{item.help} (a run of: {', '.join(stages)})")
    parser.add_argument("--web", action="store_true",
                        help="serve a page to explore the run in a browser (pip install -e '.[web]')")
    parser.add_argument("--host", default="127.0.0.1", help="--web: the address to serve on")
    parser.add_argument("--port", type=int, default=7860, help="--web: the port to serve on")
    parser.add_argument("--max-waiting", type=int, default=MAX_WAITING,
                        help="--web: requests that may wait behind the one being answered; more are told it is busy")
    parser.add_argument("--max-image-steps", type=int, default=MAX_IMAGE_STEPS,
                        help="--web: the most images x steps one request may ask for")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="--web: the largest upload")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_intermixed_args(argv)
    args.n = args.n or (1000 if args.evaluate or args.sweep else 8)
    args.command = ["python", "sample.py", *(sys.argv[1:] if argv is None else argv)]
    return args


@cli_errors
def main(argv: list[str] | None = None) -> int:
    declared, kinds = stage_declarations("inputs"), stage_declarations("conditions")  # what every stage declares
    args = parse_args(argv, declared, kinds)
    if args.web:
        return serve(args.run, args.device, args.host, args.port, max_waiting=args.max_waiting,
                     max_image_steps=args.max_image_steps, max_upload_mb=args.max_upload_mb)
    check_request(n=args.n, strength=args.strength, **({} if args.steps is None else {"steps": args.steps}))
    if args.rank is not None and not (args.clip and 0 < args.rank <= args.n):
        raise UserError("--rank K needs --clip CLIP_RUN and 0 < K <= --n (the candidates per row)")
    # the images, read before loading models: they fail first
    inputs, init_images = read_inputs(args.init_image, vars(args), tuple(item for item, _ in declared.values()))
    clip = load_scorer(args.clip) if args.clip else None
    stage, model, folder = load_for_sampling(args.run, args.device, args.overrides)
    if init_images is not None and stage.pixels() != FASHION_MNIST:
        init_images = read_image(args.init_image, pixels=stage.pixels())  # the size and colours of the run's images
    can = stage.capabilities
    check_asked(stage, args, inputs, declared, kinds)
    if args.lora:
        stage.add_adapters(model, args.lora)
    if not can.generates:  # a run that makes no new images (it reconstructs, or scores): its numbers or preview
        return inspect_run(stage, model, folder, args)
    if args.attributes and not (args.evaluate or args.sweep):
        raise UserError("--attributes is measured with --evaluate or --sweep W [W ...]")
    prompts = vars(args).get("prompt") or []
    if args.weights and len(args.weights) != len(prompts):
        raise UserError(f"--weights needs one weight per --prompt: {len(args.weights)} weights, "
                        f"{len(prompts)} prompts")
    if can.inputs and (args.evaluate or args.sweep):
        return evaluate_image_run(stage, model, folder, args, inputs)
    if args.evaluate or args.sweep:
        return evaluate(stage, model, folder, args, clip)
    settings = dict(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                    progress=True, negative_prompt=args.negative_prompt)
    if can.inputs:
        settings["inputs"] = inputs
    kind, rows = rows_asked(stage, args, kinds)
    if init_images is not None:
        n = args.n * (1 if args.weights else len(rows))
        settings.update(init_images=init_images.expand(n, *init_images.shape[1:]), strength=args.strength)
    if args.weights:
        return sample_composed(stage, model, folder, args, settings)
    return sample_rows(stage, model, folder, args, settings, kind, rows, clip)


def check_asked(stage, args, inputs: dict, declared: dict, kinds: dict) -> None:
    """One clear line for anything asked of a run that its stage does not declare it can do."""
    can, run = stage.capabilities, f"{args.run} is a '{stage.name}' run"
    for name in sorted(set(inputs) - {i.name for i in can.inputs} - {"image"}):  # image: what a mask marks up
        item, stages = declared[name]
        raise UserError(f"{item.flag} is for a '{' or '.join(stages)}' run; {run}")
    prompts = can.asks("prompt")
    wants = [("--lora", args.lora, can.adapters, "takes adapters"),
             *((f"--{name}", vars(args)[name], can.asks(name) or not can.generates, f"takes {name}s")
               for name in kinds),
             ("--negative-prompt", args.negative_prompt, prompts, "takes prompts"),
             ("--phrasings", args.phrasings != "train", prompts, "takes prompts"),
             ("--weights", args.weights, can.composes, "composes prompts"),
             ("--attributes", args.attributes, "attributes" in can.measures, "measures attributes")]
    for flag, asked, able, what in wants:
        if asked and not able:
            raise UserError(f"{flag} needs a run that {what}; {run}")


def evaluate_image_run(stage, model, folder: Path, args, inputs: dict) -> None:
    """--evaluate on a run that samples from input images: its own measures on --n test images, which
    are its inputs (``stage.evaluate``)."""
    if args.sweep:
        raise UserError(f"--sweep is for runs that sample from prompts alone; a '{stage.name}' run is measured "
                        f"with --evaluate")
    if inputs:
        raise UserError(f"--evaluate takes its inputs from the test set; leave out "
                        f"{', '.join(i.flag for i in stage.capabilities.inputs)}")
    report_evaluation(stage, folder, args, stage.evaluate(model, args.n, scheduler=args.scheduler, steps=args.steps,
                                                          guidance=args.guidance, seed=args.seed))


def report_evaluation(stage, folder: Path, args, report: dict) -> None:
    """Print ``stage.evaluate``'s numbers under where they come from, and append them to metrics.jsonl."""
    print(provenance(args.command, args.device))
    print(f"{folder} (n = {args.n})")
    print(stage.report_table(report))
    append_metrics(run_dir_of(folder) / "metrics.jsonl", {"step": model_step(folder), **report})


def rows_asked(stage, args, kinds: dict):
    """The condition kind asked for (one of ``kinds`` the stage declares) and its grid rows; every class
    when none is asked for."""
    asked = [name for name in kinds if vars(args)[name]]
    if len(asked) > 1:
        raise UserError(f"ask for one kind of condition at a time, not {' and '.join('--' + a for a in asked)}")
    if not asked:
        return CLASS, CLASS.rows(stage, "all")
    kind = next(k for k in stage.capabilities.conditions if k.name == asked[0])
    return kind, [row for value in vars(args)[kind.name] for row in kind.rows(stage, value)]


def sample_rows(stage, model, folder: Path, args, settings: dict, kind, rows: list[str], clip=None) -> None:
    """One grid row per row asked for: a class (a run that takes prompts: prompts of that class), a
    prompt, or a value of the stage's own kind of condition."""
    asked = [row for row in rows for _ in range(args.n)]
    images = stage.generate_rows(model, kind.name, asked, phrasings=args.phrasings, **settings)
    labels = torch.tensor([stage.class_names.index(r) if kind.name == CLASS.name else -1 for r in asked])
    if args.rank:
        scores = clip.score_classes(images, labels, args.phrasings) if labels[0] >= 0 else clip.score(images, asked)
        images, labels = rank_candidates(scores, images, labels, args)
    write_samples(stage, folder, args, images, labels, rows)


def sample_composed(stage, model, folder: Path, args, settings: dict) -> None:
    """--prompt ... --weights ...: one row, the prompts composed."""
    prompts = vars(args)["prompt"]
    images = stage.generate_composed(model, prompts, args.weights, args.n, **settings)
    row = " + ".join(f"{w:g} x {p!r}" for w, p in zip(args.weights, prompts))
    write_samples(stage, folder, args, images, torch.full((args.n,), -1), [row])


def rank_candidates(scores: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, args):
    """--rank K: of each row's n candidates keep the K that CLIP scores highest (``scores``, best first),
    and say what that bought against keeping K at random (the first K: the candidates are independent)."""
    kept = ev.best_of_groups(scores, args.n, args.rank)
    first = torch.arange(len(images)).view(-1, args.n)[:, : args.rank].flatten()
    for name, index in (("ranked by CLIP", kept), ("kept at random", first)):
        line = f"{name}: CLIP score {scores[index].mean():.2f}"
        if labels[0] >= 0:
            line += f", judge accuracy {accuracy(ev.cached_judge(), LabelledImages(images[index], labels[index])):.3f}"
        print(f"{line} ({len(index)} of {len(images)} candidates)")
    return images[kept], labels[kept]


def write_samples(stage, folder: Path, args, images: torch.Tensor, labels: torch.Tensor, rows: list[str]) -> None:
    """The grid PNG (and, with --save-array, the images and their labels as .npy)."""
    out = Path(args.out) if args.out else run_dir_of(folder) / "samples" / f"sample-{folder.name}.png"
    s = stage.sampling_settings(guidance=args.guidance, scheduler=args.scheduler, steps=args.steps, seed=args.seed)
    title = f"{folder}: {s['scheduler']}, {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}"
    if args.negative_prompt:
        title += f", negative prompt {args.negative_prompt!r}"
    if args.init_image:
        title += f", img2img strength {args.strength:g}"
    grid, row_titles = rows_of(images, rows, len(images) // len(rows))
    save_grid(grid, out, row_titles, title=title)
    print(f"wrote {out}")
    if args.save_array:
        array_path = Path(args.save_array).with_suffix(".npy")
        array_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(array_path, images.numpy())
        np.save(array_path.with_name(array_path.stem + "_labels.npy"), labels.numpy())
        print(f"wrote {array_path} and its labels")


def inspect_run(stage, model, folder: Path, args) -> None:
    """A run that makes no new images (it reconstructs them, or scores them against text): --evaluate prints
    its numbers on the first n test images; otherwise its preview grid."""
    if args.evaluate:
        return report_evaluation(stage, folder, args, stage.evaluate(model, args.n))
    out = Path(args.out) if args.out else run_dir_of(folder) / "samples" / f"preview-{folder.name}.png"
    print(f"wrote {stage.preview(model, out, title=str(folder))}")


def evaluate(stage, model, folder: Path, args, clip=None) -> None:
    """--evaluate: one row of metrics, appended to the run's metrics.jsonl; --sweep: a table,
    a trade-off plot and a same-seed grid per guidance scale. With ``clip``, the CLIP score too."""
    run_dir = run_dir_of(folder)
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    settings = dict(scheduler=args.scheduler, steps=args.steps, seed=args.seed, phrasings=args.phrasings)
    scales = args.sweep or [args.guidance]
    reports = [ev.evaluate_model(stage, model, args.n, guidance=w, progress=True, clip=clip, **settings)
               for w in scales]
    print(provenance(args.command, args.device))
    print(f"{folder} (n = {args.n}; FD floor = real train vs real test at the same n)")
    print(ev.format_table(reports))
    if args.attributes:
        print(stage.measure("attributes", model, scales, out_dir, guidance=args.guidance, scheduler=args.scheduler,
                            steps=args.steps, seed=args.seed))
    if args.sweep:
        name = "sweep" if args.phrasings == "train" else f"sweep_{args.phrasings}"
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
    append_metrics(run_dir / "metrics.jsonl", {"step": model_step(folder), **ev.as_metrics(report)})
    print(f"wrote {png}; appended to {run_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
