"""DreamBooth and LoRA: the identifier, the two halves of the batch, the subject, saving in diffusers'
formats, exact resume, bad input, and the measured report."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conditioning.text.captions import class_captions, class_prompt
from conditioning.finetune.dreambooth import class_images, stacked, subject_prompt
from conditioning.finetune.lora import WEIGHTS_NAME
from conditioning.finetune.start import starting_model
from conditioning.finetune.subject import Likeness, choose_subject, read_subject, rest_of_class
from ddpm.checkpoint import load_tensors
from ddpm.data import load_fashion_mnist
from ddpm.errors import UserError
from ddpm.plots import read_metrics
from ddpm.runs import load_config, load_for_sampling

from benchmarks.dreambooth_report import main as dreambooth_report_main

from .conftest import ROOT, TINY_DREAMBOOTH, assert_resume_is_exact, dreambooth_config, one_line_error, run


@pytest.fixture(scope="module")
def lora_run(tiny_dreambooth_runs):
    return tiny_dreambooth_runs["lora"]


@pytest.fixture(scope="module")
def full_run(tiny_dreambooth_runs):
    return tiny_dreambooth_runs["full"]


def test_the_identifier_is_one_spare_token(trained_tiny_text_run, tmp_path):
    stage, _, _ = load_config(dreambooth_config(tmp_path / "db", trained_tiny_text_run))
    token = stage.condition.check_identifier()
    tokenizer = stage.condition.text_encoder().tokenizer
    assert tokenizer.convert_ids_to_tokens(token) == "<|spare_0|>" and token >= 49408  # after CLIP's own 49,408
    ids = tokenizer(stage.condition.instance_prompt).input_ids
    assert stage.condition.instance_prompt == "a photo of a <|spare_0|> bag" and ids.count(token) == 1
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "<|spare_0|>",
                                                          "bag</w>"]
    split = load_config(dreambooth_config(tmp_path / "db", trained_tiny_text_run, subject={"identifier": "qzxv"}))[0]
    with pytest.raises(UserError, match=r"is 3 tokens \[.q., .z., .xv</w>.\]"):
        split.condition.check_identifier()


@pytest.mark.parametrize("classes", ["subject", "all"])
def test_each_half_of_the_batch_is_what_it_claims(trained_tiny_text_run, tmp_path, classes):
    stage, _, _ = load_config(dreambooth_config(tmp_path / "db", trained_tiny_text_run, data={"flip": False},
                                                prior={"classes": classes, "num_class_images": 2}))
    data = stage.load_data()
    # the class images are the starting model's answers to the class prompts, made once and cached
    _, base, _ = load_for_sampling(trained_tiny_text_run)
    prompts = ["a photo of a bag"] if classes == "subject" else [class_prompt(c) for c in stage.class_names]
    assert stage.condition.training_prompts == ["", "a photo of a <|spare_0|> bag", *prompts]
    made = torch.cat([class_images(stage, p) for p in prompts])
    assert torch.equal(made[:2], stage.generate_prompts(base, [prompts[0]] * 2, guidance=1, seed=0))
    assert torch.equal(made[-2:], stage.generate_prompts(base, [prompts[-1]] * 2, guidance=1, seed=0))

    n = len(data["instance_latents"])
    bags = (data["class_caption"] == 2 + prompts.index("a photo of a bag")).float().mean().item()
    assert n == (4 if classes == "subject" else 2 * 9 + 9 * 2)  # the 4 pictures; the bags 9 times, 9 other classes
    assert bags == (1.0 if classes == "subject" else 0.5)  # every class: half of the class rows are bags
    batch = stage.make_batch({k: v[torch.arange(4)] for k, v in data.items()}, torch.Generator().manual_seed(0))
    both = stacked(batch)
    assert len(both["x0"]) == 8
    space = stage.space.latent_space()
    assert torch.allclose(both["x0"][:4], space.encode(read_subject("bag")), atol=1e-5)  # instance rows first...
    cycled = made[torch.arange(4) % len(made)]
    assert torch.allclose(both["x0"][4:], space.encode(cycled), atol=1e-5)  # ...then the class rows,
    kept = both["captions"] != 0  # each captioned with the prompt it answered (unless dropped to "")
    asked = torch.tensor([1] * 4 + [2 + i // 2 if classes == "all" else 2 for i in range(4)])
    assert torch.equal(both["captions"][kept], asked[kept])

    model = stage.build_model()
    parts = stage.loss(model, batch)
    each = stage.example_losses(model, both)
    assert torch.allclose(parts["instance_loss"], each[:4].mean())
    assert torch.allclose(parts["prior_loss"], each[4:].mean())
    assert torch.allclose(parts["loss"], parts["instance_loss"] + parts["prior_loss"])  # prior.weight 1


def test_a_prior_of_training_images(trained_tiny_text_run, tmp_path):
    config = dreambooth_config(tmp_path / "db", trained_tiny_text_run,
                               prior={"classes": "all", "num_class_images": 3, "images": "dataset"})
    stage = load_config(config)[0]
    train_set = load_fashion_mnist("train")
    for c, prompt in enumerate(class_prompt(name) for name in stage.class_names):
        images = class_images(stage, prompt)
        same = (train_set.images[:, None] == images).flatten(2).all(2)  # training image i is class image j
        found = same.nonzero()
        assert set(found[:, 1].tolist()) == {0, 1, 2} and len({i.numpy().tobytes() for i in images}) == 3, \
            "three different training images"
        assert (train_set.labels[found[:, 0]] == c).all(), f"the class images of {prompt!r} are of another class"
    again = load_config(config)[0]
    assert torch.equal(class_images(stage, "a photo of a bag"), class_images(again, "a photo of a bag"))
    too_many = load_config(dreambooth_config(tmp_path / "db2", trained_tiny_text_run,
                                             prior={"num_class_images": 10**6, "images": "dataset"}))[0]
    with pytest.raises(UserError, match="prior.num_class_images=1000000 but the training set has"):
        class_images(too_many, "a photo of a bag")


@pytest.mark.parametrize("captions", ["class_prompt", "training"])
def test_class_rows_are_captioned_with_their_class_prompt_or_training_captions(trained_tiny_text_run, tmp_path,
                                                                              captions):
    stage = load_config(dreambooth_config(tmp_path / "db", trained_tiny_text_run, diffusion={"p_uncond": 0.0},
                                          prior={"classes": "all", "num_class_images": 2, "images": "dataset",
                                                 "captions": captions}))[0]
    data = stage.load_data()
    classes = torch.tensor([stage.class_names.index(c) for c in stage.condition.prior_classes])
    labels = classes[data["class_caption"] - 2]
    assert torch.equal(data["class_label"], labels)
    drawn = []
    for seed in range(4):  # the steps of a run draw again
        batch = stage.make_batch(data, torch.Generator().manual_seed(seed))
        assert torch.equal(batch["captions"], data["instance_caption"])  # the instance prompt, always
        drawn.append(batch["prior_captions"])
    drawn = torch.stack(drawn)
    prompts = [[stage.condition.training_prompts[i] for i in row.tolist()] for row in drawn.T]
    if captions == "class_prompt":
        assert all(p == [class_prompt(stage.class_names[c])] * 4 for p, c in zip(prompts, labels.tolist()))
    else:
        assert all(set(p) <= set(class_captions()[c]) for p, c in zip(prompts, labels.tolist()))
        assert len({p for row in prompts for p in row}) > 2 * len(stage.class_names), "several phrasings per class"


def assert_lora_samples_as_its_run(lora_run, text_run, prompt: str, tmp_path) -> None:
    """sample.py: the LoRA run, and the text run with --lora, give the same pixels."""
    arrays = []
    for args in ([str(lora_run)], [str(text_run), "--lora", str(lora_run / "final")]):
        out = tmp_path / f"{len(arrays)}.npy"
        result = run("sample.py", *args, "--prompt", prompt, "--n", "2", "--steps", "2",
                     "--save-array", str(out), "--out", str(tmp_path / "grid.png"))
        assert result.returncode == 0, result.stderr
        arrays.append(np.load(out))
    assert np.array_equal(*arrays)


def test_lora_trains_only_adapters_and_loads_in_diffusers(lora_run, trained_tiny_text_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    stage, model, folder = load_for_sampling(lora_run)
    assert sorted(p.name for p in folder.iterdir()) == ["dreambooth.json", WEIGHTS_NAME]
    info = json.loads((folder / "dreambooth.json").read_text())
    assert info["instance_prompt"] == "a photo of a <|spare_0|> bag" and info["lora_rank"] == 2
    # the UNet under the adapters is init_from's, untouched; the adapters moved away from B = 0
    base = load_for_sampling(trained_tiny_text_run)[1].state_dict()
    weights = model.state_dict()
    for name, value in base.items():
        module, tensor = name.rsplit(".", 1)
        assert torch.equal(weights.get(name, weights.get(f"{module}.base_layer.{tensor}")), value)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    assert (folder / WEIGHTS_NAME).stat().st_size < 0.5 * sum(v.numel() * 4 for v in base.values())

    # diffusers' own pipeline, with the LoRA loaded its way, predicts what our model predicts
    pipe = StableDiffusionPipeline.from_pretrained(trained_tiny_text_run / "final", safety_checker=None,
                                                   local_files_only=True)
    pipe.load_lora_weights(folder)
    x, t = torch.randn(2, *stage.space.sample_shape), torch.tensor([500, 20])
    condition = stage.condition.prompt_condition([stage.condition.instance_prompt, "a bag"])
    with torch.no_grad():
        ours = model(x, t, **condition).sample
        theirs = pipe.unet(x, t, **condition).sample
    assert torch.allclose(ours, theirs, atol=1e-5)

    assert_lora_samples_as_its_run(lora_run, trained_tiny_text_run, stage.condition.instance_prompt, tmp_path)
    one_line_error(run("sample.py", str(trained_tiny_text_run), "--lora", str(trained_tiny_text_run / "final"),
                       "--prompt", "a bag"), "holds no LoRA")


def test_loss_halves_are_logged_and_full_fine_tunes_export_a_pipeline(full_run, trained_tiny_text_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    records = [r for r in read_metrics(full_run / "metrics.jsonl") if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["instance_loss"] + r["prior_loss"], rel=1e-5) for r in records)
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    pipe = StableDiffusionPipeline.from_pretrained(full_run / "final", safety_checker=None, local_files_only=True)
    out = pipe("a photo of a <|spare_0|> bag", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape[:3] == (1, 32, 32)
    no_prior = train.train(dreambooth_config(tmp_path / "no_prior", trained_tiny_text_run, prior={"weight": 0}))
    assert not any("prior_loss" in r for r in read_metrics(no_prior / "metrics.jsonl"))


def test_a_learnt_identifier_trains_with_the_unet_and_names_the_subject(trained_tiny_text_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    straight = train.train(dreambooth_config(tmp_path / "learnt", trained_tiny_text_run,
                                             subject={"learn_identifier": True}))
    stage, model, folder = load_for_sampling(straight)
    base_stage, _, _ = load_for_sampling(trained_tiny_text_run)
    encoder, token = stage.condition.text_encoder(), stage.condition.identifier_id
    learnt = load_tensors(folder / "learned_embeds.safetensors")["<|spare_0|>"]
    start = base_stage.condition.text_encoder().model.get_input_embeddings().weight[token]
    assert learnt.shape == start.shape and not torch.allclose(learnt, start)  # it trained
    # encode_with_word is the encoder with that row replaced, and differentiable in it
    vector = start.clone().requires_grad_(True)
    states = base_stage.condition.text_encoder().encode_with_word(stage.condition.instance_prompt, token, vector)
    assert torch.allclose(states, base_stage.condition.embed([stage.condition.instance_prompt])[0], atol=1e-6)
    states.sum().backward()
    assert vector.grad.abs().max() > 0
    # after loading, the instance prompt means the learnt word; prompts without it are unchanged
    assert torch.equal(encoder.model.get_input_embeddings().weight[token], learnt)
    assert not torch.allclose(stage.condition.embed([stage.condition.instance_prompt]),
                              base_stage.condition.embed([stage.condition.instance_prompt]))
    assert torch.equal(stage.condition.embed(["a photo of a bag"]), base_stage.condition.embed(["a photo of a bag"]))
    learnt_states = stage.condition.embed([stage.condition.instance_prompt])
    starting_model(stage)  # init_from's UNet alone: this stage keeps its own text encoder
    assert stage.condition.text_encoder() is encoder
    assert torch.equal(stage.condition.embed([stage.condition.instance_prompt]), learnt_states)
    # unet/ is the UNet alone; the exported pipeline's text encoder knows the word
    assert "identifier_embedding" not in model.state_dict()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token], learnt)
    # a checkpoint carries the word with the EMA weights, and resuming continues exactly
    checkpoint = load_for_sampling(straight / "checkpoints" / "step-00000006")[1]
    assert torch.equal(checkpoint.identifier_embedding.detach(), learnt)
    assert_resume_is_exact(straight, tmp_path / "resumed")
    # LoRA: the word beside the adapters, and --lora on the text run loads both
    lora = train.train(dreambooth_config(tmp_path / "lora", trained_tiny_text_run, lora={"rank": 2},
                                         subject={"learn_identifier": True}))
    assert (lora / "final" / "learned_embeds.safetensors").is_file()
    assert_lora_samples_as_its_run(lora, trained_tiny_text_run, stage.condition.instance_prompt, tmp_path)
    # diffusers: the adapters with load_lora_weights, the word into its row of the text encoder's embeddings
    pipe = StableDiffusionPipeline.from_pretrained(trained_tiny_text_run / "final", safety_checker=None,
                                                   local_files_only=True)
    pipe.load_lora_weights(lora / "final")
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[token] = load_tensors(
            lora / "final" / "learned_embeds.safetensors")["<|spare_0|>"]
    ids = pipe.tokenizer(stage.condition.instance_prompt, padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    ours = load_for_sampling(lora)[0].condition.embed([stage.condition.instance_prompt])[0]
    assert torch.allclose(pipe.text_encoder(ids).last_hidden_state[0], ours, atol=1e-5)
    bad = {"<|spare_0|>": torch.zeros(3)}
    with pytest.raises(UserError, match="not a token of this text encoder's tokenizer with"):
        stage.condition.learn_words(bad)


def test_resume_continues_the_same_lora_run_exactly(lora_run, tmp_path):
    assert_resume_is_exact(lora_run, tmp_path / "resumed")


def test_bad_input_is_one_clear_line(trained_tiny_text_run, trained_tiny_run, tmp_path):
    def train_error(*overrides, init_from=trained_tiny_text_run):
        return run("train.py", str(TINY_DREAMBOOTH), f"train.output_dir={tmp_path / 'out'}", f"init_from={init_from}",
                   *overrides)

    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(train_error(f"subject.images={empty}", "subject.class_name=Bag"), "holds no images")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.png").write_bytes(b"not a png")
    one_line_error(train_error(f"subject.images={broken}", "subject.class_name=Bag"), "not an image file")
    large = tmp_path / "large"
    large.mkdir()
    Image.new("L", (64, 64)).save(large / "0.png")
    one_line_error(train_error(f"subject.images={large}", "subject.class_name=Bag"), "is 64 x 64", "28 x 28")
    one_line_error(train_error(f"subject.images={large}"), "subject.class_name is not set")
    one_line_error(train_error("subject.identifier=sksqzx"), "subject.identifier", "tokens")
    one_line_error(train_error(init_from=trained_tiny_run), "is a 'ddpm' run", "text run")
    one_line_error(train_error(init_from=tmp_path), "not a run directory")
    one_line_error(train_error("model.layers_per_block=2"), "model comes from init_from")
    one_line_error(train_error("diffusion.prediction_type=v_prediction"), "diffusion.prediction_type is",
                   "init_from", "was trained with")
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_the_default_subject_is_a_distinctive_group_of_test_images(fashion_mnist):
    subject = read_subject("bag")
    info = json.loads((ROOT / "conditioning" / "subjects" / "bag" / "subject.json").read_text())
    from ddpm.data import load_fashion_mnist

    test = load_fashion_mnist("test")
    assert torch.equal(subject, test.images[info["test_indices"]]) and info["class"] == "Bag"
    assert len(rest_of_class("Bag", subject)) == int((test.labels == 8).sum()) - 4
    # the rule: three copies of an odd image among many alike are the group it picks
    g = torch.Generator().manual_seed(0)
    common = (torch.rand(1, 28, 28, generator=g) * 255).to(torch.uint8)
    images = (common.float() + torch.randn(30, 28, 28, generator=g) * 20).clamp(0, 255).to(torch.uint8)
    odd = torch.zeros(28, 28, dtype=torch.uint8)
    odd[5:10] = 255
    images[[3, 17, 25]] = odd
    chosen, coherence, distinctness = choose_subject(images, torch.ones(30, dtype=torch.bool), k=3)
    assert sorted(chosen.tolist()) == [3, 17, 25] and coherence == pytest.approx(1.0) and distinctness < 0.5


def test_the_subject_rate_counts_the_subject_and_few_other_bags(fashion_mnist):
    subject = read_subject("bag")
    rest = rest_of_class("Bag", subject)
    likeness = Likeness(subject, rest)
    assert likeness(rest)["subject_rate"] == pytest.approx(0.05, abs=0.002)  # real other bags: 5%, by construction
    assert likeness(subject)["subject_rate"] == likeness.ceiling()["subject_rate"] == 1.0
    assert likeness(rest[:8])["subject_rate"] < likeness(torch.cat([subject, rest[:4]]))["subject_rate"]


def test_subject_prompts():
    assert subject_prompt("a photo of {}", "<|spare_3|>", "Ankle boot") == "a photo of an <|spare_3|> ankle boot"
    assert subject_prompt("{} on a black background", "", "Trouser") == "a pair of trousers on a black background"


def test_the_report_measures_before_and_after(lora_run, trained_tiny_clip, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert dreambooth_report_main([str(lora_run), "--clip", str(trained_tiny_clip), "--n", "4", "--n-classes", "10",
                                   "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    ceiling, before, after = rows.values()
    assert ceiling["judge_subject"] > 0.5  # the subject's pictures are alike
    assert after["trainable_parameters"] < 0.1 * sum(p.numel() for p in load_for_sampling(lora_run)[1].parameters())
    assert ceiling["subject_rate"] == 1.0
    for key in ("judge_subject", "judge_rest", "clip_subject", "rephrased_clip_score", "class_prompt_subject_judge",
                "subject_rate", "class_prompt_subject_rate", "other_classes_accuracy", "diversity"):
        assert np.isfinite(before[key]) and np.isfinite(after[key])
    assert "| subject pictures (ceiling) |" in printed and "versions: torch" in printed

