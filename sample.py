"""Sample a trained run into a PNG grid (and optionally raw arrays for evaluation).

    python sample.py runs/ddpm_fashion_quick --class 9            # 8 ankle boots
    python sample.py runs/ddpm_fashion_quick --class "ankle boot" --n 16 --guidance 5
    python sample.py runs/ddpm_fashion_quick --class all --steps 50 --scheduler ddim
    python sample.py runs/ddpm_fashion_quick/checkpoints/step-00001500 --class all
    python sample.py runs/ddpm_fashion_quick --evaluate --n 1000       # judge's metrics
    python sample.py runs/ddpm_fashion_quick --sweep 0 1 2 3 5 8       # guidance sweep
    python sample.py runs/latent_fashion_quick --class all              # a latent run: the same
    python sample.py runs/autoencoder_fashion_quick --evaluate --n 10000  # PSNR, judge accuracy
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

from conditioning.adherence import WAYS, adherence_report, composition_table
from conditioning.attributes import ATTRIBUTES
from conditioning.captions import attribute_prompt, prompts_for
from conditioning.clip import ClipScorer, best_of_groups
from conditioning.lora import load_lora
from ddpm import evaluate as ev
from conditioning.structure import structure_maps
from conditioning.upscale import LOW_RES, low_res_of
from ddpm.contract import IMAGE_INPUTS
from ddpm.data import IMAGE_SIZE, LabelledImages, class_index, read_image
from ddpm.diffusion import SAMPLERS
from ddpm.errors import UserError, cli_errors
from ddpm.judge import accuracy
from ddpm.plots import append_metrics, rows_of, save_grid
from ddpm.provenance import provenance
from ddpm.runs import load_for_sampling, model_step, run_dir_of
from ddpm.web import MAX_IMAGE_STEPS, MAX_UPLOAD_MB, MAX_WAITING, serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory or checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="change how the run samples, as train.py takes them (right after RUN): "
                             "sample.guidance_interval=null, sample.clip_denoised=false, upscale.noise_level=50, "
                             "inpaint.keep_known=false")
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
    parser.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                        help="a text run: one row that composes the --prompt's, each pulling with its weight "
                             "(negative: pushing away), e.g. --prompt 'a dark coat' --prompt 'a small coat' "
                             "--weights 1 1")
    parser.add_argument("--negative-prompt", default="", help="a text run: guide away from this prompt")
    parser.add_argument("--phrasings", choices=["train", "unseen"], default="train",
                        help="a text run with --class/--evaluate/--sweep: prompts from the training "
                             "captions or from phrasings never trained on")
    parser.add_argument("--attributes", action="store_true",
                        help="a text run with --evaluate/--sweep: also measure attribute adherence "
                             "('a dark coat' -> dark coats?), on held-out pairs, and composition")
    parser.add_argument("--clip", default=None, metavar="CLIP_RUN",
                        help="a CLIP run (configs/clip_fashion_quick.yaml): add the CLIP score to "
                             "--evaluate/--sweep, and rank candidates with --rank")
    parser.add_argument("--rank", type=int, default=None, metavar="K",
                        help="generate --n candidates per row and keep the K that --clip scores highest")
    parser.add_argument("--lora", default=None, metavar="FOLDER",
                        help="a text run: add these LoRA adapters (diffusers' format) to its UNet")
    parser.add_argument("--init-image", default=None, metavar="PNG", help="img2img: start from this image")
    parser.add_argument("--strength", type=float, default=0.6,
                        help="img2img: 0 returns the image (through the autoencoder), 1 ignores it")
    parser.add_argument("--low-res", default=None, metavar="PNG",
                        help="a super-resolution run: the 8 x 8 image to upscale (a 28 x 28 one is shrunk first)")
    parser.add_argument("--mask", default=None, metavar="PNG",
                        help="an inpainting run: 28 x 28, white where the --init-image is to be painted")
    parser.add_argument("--structure", default=None, metavar="PNG",
                        help="a structure run: make garments with this image's edges")
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
    args = parse_args(argv)
    if args.web:
        return serve(args.run, args.device, args.host, args.port, max_waiting=args.max_waiting,
                     max_image_steps=args.max_image_steps, max_upload_mb=args.max_upload_mb)
    if args.n <= 0 or (args.steps is not None and args.steps <= 0):
        raise UserError("--n and --steps must be positive")
    if not 0 <= args.strength <= 1:
        raise UserError(f"--strength must be in [0, 1], got {args.strength}")
    if args.rank is not None and not (args.clip and 0 < args.rank <= args.n):
        raise UserError("--rank K needs --clip CLIP_RUN and 0 < K <= --n (the candidates per row)")
    inputs = read_inputs(args)  # fail before loading models
    init_images = read_image(args.init_image) if args.init_image and not args.mask else None
    clip = ClipScorer.from_run(args.clip) if args.clip else None
    stage, model, folder = load_for_sampling(args.run, args.device, args.overrides)
    can = stage.capabilities
    if args.lora:
        if "prompt" not in can.conditions:
            raise UserError(f"--lora adds adapters to a text run's UNet; {args.run} is a '{stage.name}' run")
        load_lora(model, args.lora)
    if not can.generates:  # an autoencoder or a CLIP run: its numbers or its preview grid
        return inspect_run(stage, model, folder, args)
    takes_images = check_inputs(stage, inputs, args)
    if (args.prompts or args.negative_prompt) and "prompt" not in can.conditions:
        raise UserError(f"--prompt and --negative-prompt need a text run; {args.run} is a "
                        f"'{stage.name}' run: ask for --class instead")
    if args.phrasings != "train" and "prompt" not in can.conditions:
        raise UserError(f"--phrasings needs a text run; {args.run} is a '{stage.name}' run")
    if (args.attributes or args.weights) and "prompt" not in can.conditions:
        raise UserError(f"--attributes and --weights need a text run; {args.run} is a '{stage.name}' run")
    if args.attributes and not (args.evaluate or args.sweep):
        raise UserError("--attributes is measured with --evaluate or --sweep W [W ...]")
    if args.weights and len(args.weights) != len(args.prompts or []):
        raise UserError(f"--weights needs one weight per --prompt: {len(args.weights)} weights, "
                        f"{len(args.prompts or [])} prompts")
    if takes_images and (args.evaluate or args.sweep):
        return evaluate_image_run(stage, model, folder, args, inputs)
    if args.evaluate or args.sweep:
        return evaluate(stage, model, folder, args, clip)
    settings = dict(scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                    progress=True, negative_prompt=args.negative_prompt)
    if takes_images:
        settings["inputs"] = inputs
    if init_images is not None:
        n = args.n * (1 if args.weights else len(args.prompts or classes_asked(args, stage)))
        settings.update(init_images=init_images.expand(n, -1, -1), strength=args.strength)
    if args.weights:
        return sample_composed(stage, model, folder, args, settings)
    if args.prompts:
        return sample_prompts(stage, model, folder, args, settings, clip)
    return sample_classes(stage, model, folder, args, settings, clip)


def read_inputs(args) -> dict[str, torch.Tensor | int]:
    """The input images of image-conditioned runs (--low-res, --init-image with --mask, --structure)."""
    inputs = {}
    if args.low_res:
        image = read_image(args.low_res, "--low-res", sizes=(LOW_RES, IMAGE_SIZE))
        inputs["low_res"] = image[None].float() / 127.5 - 1 if image.shape[-1] == LOW_RES else low_res_of(image)
    if args.mask:
        if not args.init_image:
            raise UserError("--mask needs --init-image, the picture to paint into")
        mask = read_image(args.mask, "--mask", sizes=(IMAGE_SIZE,), modes=("1", "L")) >= 128
        if not mask.any():
            raise UserError(f"--mask {args.mask} is all black: nothing to paint (white marks where to paint)")
        if mask.all():
            raise UserError(f"--mask {args.mask} is all white: nothing of the picture is kept; for a new picture "
                            f"sample a text run with --prompt")
        inputs |= {"image": read_image(args.init_image, sizes=(IMAGE_SIZE,)), "mask": mask}
    if args.structure:
        inputs["structure"] = structure_maps(read_image(args.structure, "--structure"))
    return inputs


def check_inputs(stage, inputs: dict, args) -> bool:
    """Whether the run takes input images; a clear error for an input it does not take."""
    needs = {"low_res": ("low_res", "upscale"), "mask": ("mask", "inpaint"),
             "image": ("mask", "inpaint"),
             "structure": ("structure", "structure")}
    for key in inputs:
        condition, stage_name = needs[key]
        if condition not in stage.capabilities.conditions:
            raise UserError(f"--{key.replace('_', '-')} is for a '{stage_name}' run; {args.run} is a "
                            f"'{stage.name}' run")
    return any(c in IMAGE_INPUTS for c in stage.capabilities.conditions)


def evaluate_image_run(stage, model, folder: Path, args, inputs: dict) -> None:
    """--evaluate on an image-conditioned run: its measures on --n test images (``stage.evaluate``;
    the test images are the inputs), as a table,
    appended to the run's metrics.jsonl."""
    if args.sweep:
        raise UserError(f"--sweep is for runs that sample from prompts alone; a '{stage.name}' run is measured "
                        f"with --evaluate")
    if inputs:
        raise UserError("--evaluate takes its inputs from the test set; leave out --low-res, --mask and --structure")
    report = stage.evaluate(model, args.n, scheduler=args.scheduler, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, **inputs)
    print(provenance(args.command, args.device))
    print(f"{folder} (n = {args.n} test images)")
    print(stage.report_table(report))
    append_metrics(run_dir_of(folder) / "metrics.jsonl", {"step": model_step(folder), **report})


def classes_asked(args, stage) -> list[int]:
    wanted = args.classes or ["all"]
    if "all" in wanted:
        return list(range(len(stage.class_names)))
    return [class_index(c, stage.class_names) for c in wanted]


def sample_classes(stage, model, folder: Path, args, settings: dict, clip=None) -> None:
    """--class: one row per class asked for (a text run: prompts of that class)."""
    classes = classes_asked(args, stage)
    labels = torch.tensor(classes).repeat_interleave(args.n)
    images = stage.generate(model, labels, phrasings=args.phrasings, **settings)
    if args.rank:
        images, labels = rank_candidates(clip, images, labels, prompts_for(labels, args.phrasings), args)
    write_samples(stage, folder, args, images, labels, [stage.class_names[c] for c in classes])


def sample_prompts(stage, model, folder: Path, args, settings: dict, clip=None) -> None:
    """--prompt: one row per prompt."""
    prompts = [p for p in args.prompts for _ in range(args.n)]
    images = stage.generate_prompts(model, prompts, **settings)
    labels = torch.full((len(prompts),), -1)
    if args.rank:
        images, labels = rank_candidates(clip, images, labels, prompts, args)
    write_samples(stage, folder, args, images, labels, args.prompts)


def sample_composed(stage, model, folder: Path, args, settings: dict) -> None:
    """--prompt ... --weights ...: one row, the prompts composed."""
    images = stage.generate_composed(model, args.prompts, args.weights, args.n, **settings)
    row = " + ".join(f"{w:g} x {p!r}" for w, p in zip(args.weights, args.prompts))
    write_samples(stage, folder, args, images, torch.full((args.n,), -1), [row])


def rank_candidates(clip, images: torch.Tensor, labels: torch.Tensor, prompts: list[str], args):
    """--rank K: of each row's n candidates keep the K that CLIP scores highest (best first), and
    say what that bought against keeping K at random (the first K: the candidates are independent)."""
    scores = clip.score(images, prompts)
    kept = best_of_groups(scores, args.n, args.rank)
    first = torch.arange(len(images)).view(-1, args.n)[:, : args.rank].flatten()
    for name, index in (("ranked by CLIP", kept), ("kept at random", first)):
        line = f"{name}: CLIP score {scores[index].mean():.2f}"
        if labels[0] >= 0:
            line += f", judge accuracy {accuracy(ev.cached_judge(), LabelledImages(images[index], labels[index])):.3f}"
        print(f"{line} ({len(index)} of {len(images)} candidates)")
    args.n = args.rank
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
    grid, row_titles = rows_of(images, rows, args.n)
    save_grid(grid, out, row_titles, title=title)
    print(f"wrote {out}")
    if args.save_array:
        array_path = Path(args.save_array).with_suffix(".npy")
        array_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(array_path, images.numpy())
        np.save(array_path.with_name(array_path.stem + "_labels.npy"), labels.numpy())
        print(f"wrote {array_path} and its labels")


def evaluate_attributes(stage, model, scales: list[float | None], out_dir: Path, args) -> None:
    """--attributes (``conditioning/adherence.py``): adherence at each guidance scale; composition
    of every pair of words at the run's guidance (or --guidance); eval/attributes.json; and one
    contrast grid per attribute ("a dark coat" beside "a light coat", the same seeds)."""
    settings = dict(scheduler=args.scheduler, steps=args.steps, seed=args.seed)
    rows = [{"guidance": stage.sampling_settings(guidance=w)["guidance"],
             **adherence_report(stage, model, guidance=w, progress=True, **settings)} for w in scales]
    print("attribute adherence: the share of samples in the asked bin (chance 0.5), and the judge's class "
          "accuracy on the same samples")
    print(ev.markdown_table(["w", "class accuracy", *ATTRIBUTES, "held-out pairs"],
                            [[f"{r['guidance']:g}", *(f"{r[k]:.3f}" for k in ["accuracy", *ATTRIBUTES, "held_out"])]
                             for r in rows]))
    w = stage.sampling_settings(guidance=args.guidance)["guidance"]
    pairs = composition_table(stage, model, guidance=w, **settings)
    counts = sorted({p["n_per_way"] for p in pairs})
    print(f"composition at w = {w:g}: the share of samples with both words, each prompt alone, the two composed "
          f"(weights {pairs[0]['weights'][0]:g} and {pairs[0]['weights'][1]:g}) and one prompt naming both "
          f"(n = {counts[0]} to {counts[-1]} per cell)")
    print(ev.markdown_table(["words", *WAYS], [[" + ".join(p["words"]), *(f"{p[way]:.3f}" for way in WAYS)]
                                               for p in pairs]))
    report = {"adherence": rows, "composition": {"guidance": w, "pairs": pairs}}
    (out_dir / "attributes.json").write_text(json.dumps(report, indent=1))
    for attribute, words in ATTRIBUTES.items():
        prompts = [attribute_prompt(name, [word]) for name in stage.class_names for word in words]
        images = torch.cat([stage.generate_prompts(model, [p] * 8, guidance=w, **settings) for p in prompts])
        grid, titles = rows_of(images, prompts, 8)
        save_grid(grid, out_dir / f"attributes_{attribute}.png", titles,
                  title=f"{attribute}: the same seeds, w = {w:g}")
    print(f"wrote {out_dir / 'attributes.json'} and {out_dir / 'attributes_*.png'} (contrast grids, w = {w:g})")


def inspect_run(stage, model, folder: Path, args) -> None:
    """A run that makes no images: --evaluate prints its numbers on the first n test images (an
    autoencoder: PSNR and the judge's accuracy; a CLIP: zero-shot accuracy and recall);
    otherwise its preview grid (test images above their reconstructions; what each class prompt
    finds)."""
    if args.evaluate:
        report = stage.evaluate(model, args.n)
        print(provenance(args.command, args.device))
        print(f"{folder}: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" if isinstance(v, float)
                                        else f"{k.removeprefix('eval_')} {v}" for k, v in report.items()))
        append_metrics(run_dir_of(folder) / "metrics.jsonl", {"step": model_step(folder), **report})
        return
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
        evaluate_attributes(stage, model, scales, out_dir, args)
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
