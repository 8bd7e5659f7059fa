"""The image-conditioned stages: super-resolution, inpainting, structure-to-image (``conditioning/``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conditioning.image.inpaint import (MaskConfig, draw_masks, fixed_masks, latent_cells, mark_cells, masked, padded,
                                        put_back_known, stroke_masks)
from conditioning.image.structure import structure_maps, to_latent_grid
from conditioning.image.upscale import PIPELINE_SCALING_FACTOR, low_res_of
from conditioning.finetune.start import started_from
from ddpm.data import to_model_space, to_pixels
from ddpm.diffusion import Diffusion, make_sampler
from ddpm.errors import UserError
from ddpm.runs import load_for_sampling
from ddpm.web import Explorer, Request

from .conftest import assert_resume_is_exact, one_line_error, run, same_as_command


def test_widened_unet_starts_as_the_text_run_computes(image_runs, trained_tiny_text_run):
    from conditioning.finetune.start import widen_from

    text_stage, base = load_for_sampling(trained_tiny_text_run)[:2]
    x, t = torch.randn(2, *text_stage.space.sample_shape), torch.tensor([700, 30])
    hidden = text_stage.condition.prompt_condition(["a sneaker", "a coat"])["encoder_hidden_states"]
    for name, run_dir in image_runs.items():
        stage = load_for_sampling(run_dir)[0]
        model = stage.model_class(**stage.network_args(), **stage.config.model)
        widen_from(model, base)
        extra = torch.randn(2, stage.condition.extra_channels, *x.shape[2:])
        labels = {"class_labels": torch.tensor([3, 50])} if name == "upscale" else {}
        with torch.no_grad():
            ours = model(torch.cat([x, extra], 1), t, encoder_hidden_states=hidden, **labels).sample
            theirs = base(x, t, encoder_hidden_states=hidden).sample
        assert torch.allclose(ours, theirs, atol=1e-5), name
        # and training moved the new input weights away from zero
        trained = load_for_sampling(run_dir)[1]
        assert trained.conv_in.weight[:, x.shape[1]:].abs().max() > 0, name


def test_resume_continues_the_same_inpainting_run_exactly(image_runs, tmp_path):
    assert_resume_is_exact(image_runs["inpaint"], tmp_path / "resumed")


def test_a_fine_tune_takes_the_noise_schedule_of_the_run_it_starts_from(tmp_path):
    base = tmp_path / "text_run"
    (base / "final" / "unet").mkdir(parents=True)
    (base / "final" / "unet" / "config.json").write_text("{}")
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    (base / "config.yaml").write_text(yaml.safe_dump({"stage": "text", "diffusion": {**schedule, "p_uncond": 0.2}}))
    sections = {"init_from": str(base), "diffusion": {"p_uncond": 0.1, "prediction_type": "v_prediction"}}
    # what the fine-tune leaves out is the run's schedule, not the default (linear, eps); its own keys stay
    assert started_from(sections, (), (), "a test")["diffusion"] == {**schedule, "p_uncond": 0.1}
    sections["diffusion"]["beta_schedule"] = "linear"
    with pytest.raises(UserError, match="beta_schedule is 'linear' but init_from"):
        started_from(sections, (), (), "a test")


def test_training_masks_are_seeded_and_of_every_kind():
    shares = MaskConfig(boxes=1, strokes=1, halves=1, full=1)
    a = draw_masks(400, shares, torch.Generator().manual_seed(0))
    assert torch.equal(a, draw_masks(400, shares, torch.Generator().manual_seed(0)))
    assert a.shape == (400, 28, 28) and a.dtype == torch.bool
    covered = a.float().mean((1, 2))
    assert (covered > 0).all(), "every mask paints something"
    assert 0.15 < (covered == 1).float().mean() < 0.35, "about a quarter fully masked"
    halves = [fixed_masks(side, 1)[0] for side in ("left", "right", "top", "bottom")]
    assert 0.15 < sum((a == h).all((1, 2)) for h in halves).float().mean() < 0.35
    strokes_only = draw_masks(50, MaskConfig(boxes=0, strokes=1, halves=0, full=0), torch.Generator().manual_seed(1))
    assert (strokes_only.float().mean((1, 2)) < 0.5).all()
    # a mask is mirrored with its image: padded(mask, flip) is the mirror of padded(mask)
    flip = torch.tensor([True, False])
    assert torch.equal(padded(a[:2], flip)[0], padded(a[:1])[0].flip(-1))


def test_the_mask_channel_and_the_masked_picture_agree_cell_for_cell(image_runs, fashion_mnist):
    stage = load_for_sampling(image_runs["inpaint"])[0]
    size = stage.space.sample_shape[-1]
    masks = torch.cat([fixed_masks("left", 1), stroke_masks(3, torch.Generator().manual_seed(0))])
    m = padded(masks)
    cells = latent_cells(m, size)
    # sampled nearest, as diffusers samples it, the grid misses cells that masked pixels touch
    # (the padded left half's first column of cells, most cells of a thin stroke)
    assert (F.interpolate(m, size=(size, size)) < cells).any()
    x = to_model_space(fashion_mnist.images[:4])
    concat = stage.condition.network_image(x, m, torch.Generator().manual_seed(0))
    assert torch.equal(concat[:, :1], cells), "every cell a masked pixel touches is painted"
    marked = stage.condition.pipeline_mask(masks)
    assert torch.equal(F.interpolate(marked, size=(size, size)), cells), "which the pipeline's nearest keeps"
    # the marks add one pixel per painted cell, inside it: the known pixels of a painted cell stay in the picture
    added = marked - m
    assert (added >= 0).all() and added.sum() <= cells.sum() and torch.equal(mark_cells(marked, size), marked)
    assert (latent_cells(added, size) <= cells).all()
    kept = (masked(x, marked) != 0) & (F.interpolate(cells, size=32) > 0)
    assert kept.any(), "known pixels of painted cells are not greyed"


def test_the_known_region_is_put_back_at_the_noise_level_of_the_sample():
    sampler = make_sampler("dpm++", Diffusion())
    sampler.set_timesteps(5)
    known, noise, z = torch.randn(3, 2, 4, 8, 8).unbind(0)
    paint = latent_cells(padded(fixed_masks("left", 2)), 8)
    put_back = put_back_known(sampler, noise, known, paint)
    painted = paint.bool().expand_as(z)
    assert painted.any() and not painted.all()
    t = sampler.timesteps[2]
    abar = sampler.alphas_cumprod[t]
    noised = put_back(t, z)
    assert torch.equal(noised[painted], z[painted]), "the painted cells are the sampler's"
    assert torch.allclose(noised[~painted], (abar.sqrt() * known + (1 - abar).sqrt() * noise)[~painted], atol=1e-5)
    assert torch.equal(put_back(None, z)[~painted], known[~painted]), "after the last step, the clean latents"


def test_structure_maps_follow_edges_and_a_blank_map_is_no_nan():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[0, 8:20, 8:20] = 255
    maps = structure_maps(images)
    assert maps[0].max() > 0.4 and maps[1].max() == 0
    grid = to_latent_grid(maps, 8)
    assert torch.isfinite(grid).all() and grid.shape == (2, 1, 8, 8)
    assert grid[0].min() == -1 and grid[0].max() == 1 and (grid[1] == -1).all()


def _pixels(pipeline_output: torch.Tensor) -> torch.Tensor:
    """A pipeline's output_type="pt" images (N x 1 x 32 x 32 in [0, 1]) -> uint8 N x 28 x 28."""
    return to_pixels(pipeline_output * 2 - 1)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.int() - b.int()).abs().max() <= 1


def test_exported_folders_load_in_diffusers_pipelines_and_sample_the_same(image_runs, fashion_mnist):
    from diffusers import (StableDiffusionDepth2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionUpscalePipeline)

    images = fashion_mnist.images[:2]
    prompts = ["a sneaker", "a shirt"]
    same = dict(steps=4, guidance=3.0, seed=0, scheduler="dpm++")

    def pipeline(cls, name, **kwargs):
        pipe = cls.from_pretrained(image_runs[name] / "final", local_files_only=True, **kwargs)
        pipe.scheduler = make_sampler("dpm++", load_for_sampling(image_runs[name])[0].diffusion)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(pipe, **kwargs):
        return _pixels(pipe(prompt=prompts, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                            generator=torch.Generator().manual_seed(0), **kwargs).images)

    # super-resolution: the 8 x 8 image, noise level 20
    stage, model, _ = load_for_sampling(image_runs["upscale"])
    low = low_res_of(images)
    ours = stage.generate_prompts(model, prompts, inputs={"low_res": low, "noise_level": 20}, **same)
    pipe = pipeline(StableDiffusionUpscalePipeline, "upscale")
    assert pipe.vae.config.scaling_factor == PIPELINE_SCALING_FACTOR
    assert _close(ours, call(pipe, image=(low + 1) / 2, noise_level=20))

    # inpainting: exactly 9 input channels; white = paint. The pipeline puts the known region back
    # only for a 4-channel UNet: with inpaint.keep_known it takes the same step as a callback
    stage, model, _ = load_for_sampling(image_runs["inpaint"])
    assert model.config.in_channels == 9 and stage.config.inpaint.keep_known
    masks = fixed_masks("left", 2)
    pipe = pipeline(StableDiffusionInpaintPipeline, "inpaint", safety_checker=None)
    picture, mask_image = (to_model_space(images) + 1) / 2, stage.condition.pipeline_mask(masks)
    noise = torch.randn((2, *stage.space.sample_shape), generator=torch.Generator().manual_seed(0))  # its first draw
    keep_known = stage.condition.pipeline_callback(images, masks, noise)
    ours = stage.generate_prompts(model, prompts, inputs={"image": images, "mask": masks}, **same)
    assert _close(ours, call(pipe, image=picture, mask_image=mask_image, callback_on_step_end=keep_known))
    stage.config.inpaint.keep_known = False
    plain = stage.generate_prompts(model, prompts, inputs={"image": images, "mask": masks}, **same)
    assert _close(plain, call(pipe, image=picture, mask_image=mask_image)) and not _close(plain, ours)

    # structure-to-image, loaded without a depth estimator; the pipeline is img2img, so is the comparison
    stage, model, _ = load_for_sampling(image_runs["structure"])
    maps = structure_maps(images)
    ours = stage.generate_prompts(model, prompts, inputs={"structure": maps}, init_images=images, strength=0.5,
                                  **same)
    pipe = pipeline(StableDiffusionDepth2ImgPipeline, "structure", depth_estimator=None, feature_extractor=None)
    assert pipe.depth_estimator is None
    assert _close(ours, call(pipe, image=(to_model_space(images) + 1) / 2, depth_map=maps, strength=0.5))


def test_the_page_serves_runs_that_sample_from_input_images(image_runs, tmp_path, fashion_mnist):
    """An upload per declared input (and the picture a mask marks up): the page's images are its command's."""
    picture, small, mask = tmp_path / "x.png", tmp_path / "small.png", tmp_path / "mask.png"
    Image.fromarray(fashion_mnist.images[0].numpy()).save(picture)
    Image.fromarray(((low_res_of(fashion_mnist.images[:1])[0, 0] + 1) * 127.5).round().byte().numpy()).save(small)
    Image.fromarray((fixed_masks("top", 1)[0].numpy() * 255).astype(np.uint8)).save(mask)
    for name, request in (("upscale", Request(inputs={"low_res": str(small)})),
                          ("inpaint", Request(init_image=str(picture), inputs={"mask": str(mask)})),
                          ("structure", Request(inputs={"structure": str(picture)}))):
        page = Explorer(image_runs[name])
        result = page.generate(dataclasses.replace(request, condition="prompt", value="a shirt", n=2, steps=2))
        assert same_as_command(result, tmp_path), name
        with pytest.raises(UserError, match="upload the"):
            page.generate(Request(condition="prompt", value="a shirt", n=2, steps=2))


def test_sampling_from_input_images_on_the_command_line(image_runs, trained_tiny_text_run, tmp_path, fashion_mnist):
    picture, small, mask = tmp_path / "x.png", tmp_path / "small.png", tmp_path / "mask.png"
    Image.fromarray(fashion_mnist.images[0].numpy()).save(picture)
    Image.fromarray(((low_res_of(fashion_mnist.images[:1])[0, 0] + 1) * 127.5).round().byte().numpy()).save(small)
    Image.fromarray((fixed_masks("top", 1)[0].numpy() * 255).astype(np.uint8)).save(mask)
    grid = str(tmp_path / "grid.png")
    for name, flags in (("upscale", ["--low-res", str(small)]), ("upscale", ["--low-res", str(picture)]),
                        ("inpaint", ["--init-image", str(picture), "--mask", str(mask)]),
                        ("inpaint", ["inpaint.keep_known=false", "--init-image", str(picture), "--mask", str(mask)]),
                        ("structure", ["--structure", str(picture)])):
        result = run("sample.py", str(image_runs[name]), *flags, "--prompt", "a shirt", "--n", "2", "--out", grid)
        assert result.returncode == 0, result.stderr

    # bad input: one clear line each
    blank, full, rgb, big = (tmp_path / f"{n}.png" for n in ("blank", "full", "rgb", "big"))
    Image.new("L", (28, 28), 0).save(blank)
    Image.new("L", (28, 28), 255).save(full)
    Image.new("RGB", (28, 28), (255, 0, 0)).save(rgb)
    Image.new("L", (30, 30), 255).save(big)
    inpaint, upscale = str(image_runs["inpaint"]), str(image_runs["upscale"])
    for run_dir, flags, fragment in (
            (inpaint, ["--init-image", str(picture), "--mask", str(blank)], "all black"),
            (inpaint, ["--init-image", str(picture), "--mask", str(full)], "all white"),
            (inpaint, ["--init-image", str(picture), "--mask", str(rgb)], "must be grayscale"),
            (inpaint, ["--init-image", str(picture), "--mask", str(big)], "must be 28 x 28"),
            (inpaint, ["--mask", str(mask)], "needs --init-image"),
            (inpaint, [], "give --init-image and --mask"),
            (upscale, ["--low-res", str(big)], "must be 8 x 8 or 28 x 28"),
            (upscale, ["upscale.noise_level=101", "--low-res", str(small)], "noise_level <= max_noise_level"),
            (str(trained_tiny_text_run), ["--structure", str(picture)], "is for a 'structure' run"),
            (upscale, ["--init-image", str(picture), "--mask", str(mask)], "is for a 'inpaint' run"),
            (upscale, ["inpaint.keep_known=false", "--low-res", str(small)], "unknown section 'inpaint'")):
        one_line_error(run("sample.py", run_dir, *flags, "--prompt", "a shirt", "--out", grid), fragment)


def test_image_runs_are_measured(image_runs):
    for name in ("upscale", "inpaint", "structure"):
        result = run("sample.py", str(image_runs[name]), "--evaluate", "--n", "20", "--steps", "2")
        assert result.returncode == 0, result.stderr
        assert "| ours" in result.stdout or "ours" in result.stdout, result.stdout
