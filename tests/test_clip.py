"""Our own CLIP (conditioning/clip/stage.py): the tokenizer, the loss, pooling, training, saving, and CLIP
as a metric and ranker; stage 3 on its frozen text tower."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

import train
from conditioning.text.captions import NAMELESS, CaptionTable, class_captions, prompts_for
from conditioning.clip.stage import (SPARE_TOKENS, ClipStage, alignment_loss, build_tokenizer,
                                     contrastive_loss, describes, pretrained_word_embeddings)
from ddpm.checkpoint import save_tensors
from ddpm.config import apply_overrides, read_yaml
from ddpm.errors import UserError
from ddpm.plots import read_metrics
from ddpm.runs import load_config, load_run, load_scorer

from .conftest import (ROOT, SHARED_MODELS, TINY_ALIGNED_CLIP, TINY_CLIP, TINY_TEXT, assert_resume_is_exact,
                       assert_two_processes_train_like_one, one_line_error, run, tiny_config)


def tiny_stage(preset=TINY_CLIP, *overrides: str) -> ClipStage:
    stage, _, _ = load_config(apply_overrides(read_yaml(preset), list(overrides)))
    return stage


# -- the tokenizer ----------------------------------------------------------------------------


def test_tokenizer_is_clips_own_with_spare_tokens():
    tokenizer = build_tokenizer()
    # the ids the real CLIP tokenizer gives (shared/README.md, openai/clip-vit-base-patch32)
    assert tokenizer("A photograph of a puppy").input_ids == [49406, 320, 8853, 539, 320, 6829, 49407]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408 + len(SPARE_TOKENS)
    spare = tokenizer.convert_tokens_to_ids(list(SPARE_TOKENS))
    assert spare == list(range(49408, 49408 + len(SPARE_TOKENS)))
    ordinary = tokenizer(["spare 0 <| spare_0 |> spare_0", "a handbag"]).input_ids
    assert max(max(ids) for ids in ordinary) < 49408  # no ordinary text makes a spare token
    real = SHARED_MODELS / "clip-tokenizer"
    if real.is_dir():  # the whole vocabulary, and the same ids on a few harder strings
        reference = CLIPTokenizer.from_pretrained(real, local_files_only=True)
        assert {t: i for t, i in tokenizer.get_vocab().items() if i < 49408} == reference.get_vocab()
        for text in ("flip-flops for the summer", "Café  naïve, 3.5cm!", "a catalogue shot of chelsea boots"):
            assert tokenizer(text).input_ids == reference(text).input_ids


# -- the loss -----------------------------------------------------------------------------------


def test_random_model_loss_is_about_ln_batch(fashion_mnist):
    """At the quick preset's widths random embeddings are nearly orthogonal, so every caption is
    about equally likely for every image."""
    stage = tiny_stage(ROOT / "configs" / "clip_fashion_quick.yaml", "model.word_embeddings=learnt")
    torch.manual_seed(0)
    model = stage.build_model()
    raw = {"images": fashion_mnist.images[:64], "labels": fashion_mnist.labels[:64]}
    stage.load_data()
    batch = stage.make_batch(raw, torch.Generator().manual_seed(0))
    assert abs(stage.loss(model, batch).item() - math.log(64)) < 0.2  # ln 64 = 4.16


def test_pairs_of_one_class_are_not_negatives():
    """Images and captions that are one vector per class (a perfect model of class-only captions)
    sit at the multi-positive loss's minimum: its floor, the targets' entropy, and no gradient.
    CLIP's diagonal targets would call the other pairs of a class negatives: the same embeddings
    cost about ln(pairs per class) above that loss's floor of 0."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    embeds = torch.eye(3)[labels].requires_grad_()  # orthogonal unit vectors, one per class
    loss = contrastive_loss(embeds, embeds, labels, torch.tensor(math.log(100.0)))
    loss.backward()
    per_row = (labels[:, None] == labels[None, :]).sum(1).float()
    assert loss.item() == pytest.approx(per_row.log().mean().item(), abs=1e-3)
    assert embeds.grad.abs().max() < 1e-4
    diagonal = F.cross_entropy(100 * embeds @ embeds.T, torch.arange(8))
    assert diagonal.item() == pytest.approx(per_row.log().mean().item(), abs=1e-3) and diagonal.item() > 0.5


def test_a_caption_naming_an_attribute_is_positive_only_for_images_in_that_bin():
    """A caption "a dark coat" describes the dark coats of the batch, not the light ones; one that
    names nothing describes every coat, as class-only captions do."""
    labels = torch.tensor([4, 4, 4, 1])
    bins = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]])  # dark, light, dark; a trouser
    named = torch.tensor([[0, -1, -1], [-1, -1, -1], [0, 0, -1], [-1, -1, -1]])  # dark, -, dark small, -
    assert describes(labels, named, labels, bins).tolist() == [
        [True, False, True, False], [True, True, True, False], [False, False, True, False], [False, False, False, True]]
    # positives = image and caption sets of one vector each: at the floor, no gradient
    embeds = torch.randn(4, 8)
    nothing = torch.full((4, 3), -1)
    scale = torch.tensor(math.log(100.0))
    torch.testing.assert_close(contrastive_loss(embeds, embeds, labels, scale, 100.0, nothing, bins),
                               contrastive_loss(embeds, embeds, labels, scale))  # naming nothing: class-only
    assert not torch.allclose(contrastive_loss(embeds, embeds, labels, scale, 100.0, named, bins),
                              contrastive_loss(embeds, embeds, labels, scale))


def test_a_caption_that_names_no_garment_describes_every_image():
    """Caption label -1 ("a photo of") describes every image (within the bins it names), and its
    gradient pulls it from one class towards all of them. It answers no image: an image whose class
    no caption of the batch names has no image-to-text row, and the loss stays finite."""
    labels = torch.tensor([0, 0, 1, 2])
    caption_labels = torch.tensor([0, -1, 1, 2])
    assert describes(caption_labels, None, labels, None).tolist() == [
        [True, True, False, False], [True, True, True, True], [False, False, True, False], [False, False, False, True]]
    bins = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]])
    named = torch.tensor([[-1, -1, -1], [1, -1, -1], [-1, -1, -1], [-1, -1, -1]])  # "a photo of a light one"
    assert describes(caption_labels, named, labels, bins)[1].tolist() == [False, True, False, True]
    images = torch.eye(3)[labels]
    texts = torch.eye(3)[[0, 0, 1, 2]].requires_grad_()  # the nameless caption starts on class 0
    scale = torch.tensor(math.log(20.0))
    loss = contrastive_loss(images, texts, labels, scale, caption_labels=caption_labels)
    loss.backward()
    towards_all = F.normalize(torch.ones(3), dim=0) - texts[1].detach()
    assert (-texts.grad[1] @ towards_all).item() > 0.1
    assert loss.item() != pytest.approx(contrastive_loss(images, texts, labels, scale).item(), abs=1e-3)
    no_answer = contrastive_loss(images, texts, labels, scale, caption_labels=torch.tensor([0, -1, 1, -1]))
    assert torch.isfinite(no_answer)  # image 3, class 2: no caption names it


def test_nameless_captions_replace_a_share_of_captions_with_a_bare_template(fashion_mnist):
    stage = tiny_stage(TINY_CLIP, "captions.p_nameless=0.3", "captions.word_dropout=0.3")
    raw = stage.load_data()
    batch = stage.make_batch({k: v[:200] for k, v in raw.items()}, torch.Generator().manual_seed(0))
    texts = stage.tokenizer().batch_decode(batch["input_ids"], skip_special_tokens=True)
    nameless = batch["caption_labels"] < 0
    assert 30 < nameless.sum() < 90
    assert all((text.strip() in NAMELESS) == none for text, none in zip(texts, nameless.tolist()))
    assert torch.equal(batch["caption_labels"][~nameless], batch["labels"][~nameless])
    plain = tiny_stage(TINY_CLIP)  # off by default: the batch of before, no caption labels
    plain.load_data()
    assert "caption_labels" not in plain.make_batch({k: v[:200] for k, v in raw.items()}, torch.Generator())


def test_temperature_starts_at_1_over_0_07_is_clamped_at_100_and_never_decayed():
    stage = tiny_stage()
    model = stage.build_model()
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    x, labels = F.normalize(torch.randn(6, 4), dim=-1), torch.arange(6)
    at_100 = contrastive_loss(x, x, labels, torch.tensor(math.log(100.0)))
    assert contrastive_loss(x, x, labels, torch.tensor(math.log(1000.0))) == at_100
    decayed, not_decayed = train.parameter_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert any(p is model.logit_scale for p in not_decayed["params"])
    assert not any(p is model.logit_scale for p in decayed["params"])
    assert all(p.ndim >= 2 for p in decayed["params"])


def test_a_few_hundred_steps_overfit_64_pairs(fashion_mnist):
    """64 image-caption pairs, trained on alone: the loss falls to its floor and every image is
    closest to its own class's captions."""
    stage = tiny_stage()
    torch.manual_seed(0)
    model = stage.build_model()
    raw = {"images": fashion_mnist.images[:64], "labels": fashion_mnist.labels[:64]}
    stage.load_data()
    optimizer = torch.optim.AdamW(train.parameter_groups(model, 0.0), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(300):
        loss = stage.loss(model, stage.make_batch(raw, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_row = (raw["labels"][:, None] == raw["labels"][None, :]).sum(1).float()
    assert loss.item() < per_row.log().mean().item() + 0.1
    scorer = stage.scorer(model)
    assert torch.equal(scorer.classify(raw["images"], class_captions()), raw["labels"])


# -- pooling: the embedding is read at the end-of-text token ---------------------------------------


def test_text_embedding_is_read_at_the_end_of_text_token():
    stage = tiny_stage()
    torch.manual_seed(0)
    model = stage.build_model().eval()
    tokenizer = stage.tokenizer()
    config = model.config.text_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49406, 49407, 49407)
    tokens = tokenizer(["a boot", "a photo of a summer dress"], padding="max_length", max_length=77,
                       return_tensors="pt")
    out = model.text_model(input_ids=tokens.input_ids)
    ends = (tokens.input_ids == tokenizer.eos_token_id).int().argmax(1)  # the first end-of-text token
    assert ends.tolist() == [3, 7]
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), ends])
    embeds = stage.scorer(model).text_embeds(["a boot", "a photo of a summer dress"])
    assert (embeds[0] @ embeds[1]).item() < 0.99  # two captions embed differently


# -- a trained tiny run -------------------------------------------------------------------------


def test_final_folder_loads_with_transformers(trained_tiny_clip):
    final = trained_tiny_clip / "final"
    clip = CLIPModel.from_pretrained(final, local_files_only=True)
    text = CLIPTextModel.from_pretrained(final, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(final, local_files_only=True)
    assert tokenizer("a bag").input_ids == build_tokenizer()("a bag").input_ids
    assert all(torch.equal(w, clip.state_dict()[f"text_model.{k}"]) for k, w in text.state_dict().items())
    assert text.config.eos_token_id == tokenizer.eos_token_id
    metrics = read_metrics(trained_tiny_clip / "metrics.jsonl")
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_continues_the_same_clip_run_exactly(trained_tiny_clip, tmp_path):
    assert_resume_is_exact(trained_tiny_clip, tmp_path / "resumed")


def test_two_processes_train_clip_like_one(tmp_path, fashion_mnist):
    """Each process scores its pairs against the whole gathered batch, so two processes give the
    loss and the weights of one; also with captions that name no garment, whose images' rows are
    averaged over the whole batch, and with the alignment loss, whose rows are too."""
    assert_two_processes_train_like_one(tmp_path, TINY_ALIGNED_CLIP, "captions.p_nameless=0.3")


def test_clip_on_the_command_line(trained_tiny_clip, trained_tiny_run, tmp_path):
    result = run("sample.py", str(trained_tiny_clip), "--evaluate", "--n", "200")
    assert result.returncode == 0, result.stderr
    for name in ("zero_shot_accuracy_train", "zero_shot_accuracy_unseen", "image_to_text_r5_unseen",
                 "text_to_image_r1_train", "temperature"):
        assert name in result.stdout
    result = run("sample.py", str(trained_tiny_clip), "--out", str(tmp_path / "found.png"))
    assert result.returncode == 0 and (tmp_path / "found.png").stat().st_size > 1000
    one_line_error(run("sample.py", str(trained_tiny_run), "--rank", "2", "--n", "4"), "--rank K needs --clip")
    one_line_error(run("sample.py", str(trained_tiny_run), "--clip", str(trained_tiny_run), "--n", "2"),
                   "scores no images against text")


@pytest.mark.parametrize("clip", ["trained_tiny_clip", "trained_tiny_locked_clip"])
def test_clip_score_and_ranking(clip, trained_tiny_run, tmp_path, request):
    trained_tiny_clip = request.getfixturevalue(clip)
    scorer = load_scorer(trained_tiny_clip)
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    prompts = ["a bag", "a boot", "a dress"] * 2
    cos = F.normalize(scorer.image_embeds(images), dim=-1) * scorer.text_embeds(prompts)
    assert torch.allclose(scorer.score(images, prompts), 100 * cos.sum(-1).clamp_min(0))
    kept = scorer.rank(images, prompts, group=3, keep=2)
    scores = scorer.score(images, prompts).view(2, 3)
    assert kept.tolist()[:2] == scores[0].argsort(descending=True)[:2].tolist()
    assert all(3 <= i < 6 for i in kept.tolist()[2:])
    result = run("sample.py", str(trained_tiny_run), "--class", "bag", "--class", "0", "--n", "4", "--rank", "2",
                 "--steps", "2", "--clip", str(trained_tiny_clip), "--out", str(tmp_path / "ranked.png"),
                 "--save-array", str(tmp_path / "ranked.npy"))
    assert result.returncode == 0, result.stderr
    assert "ranked by CLIP: CLIP score" in result.stdout and "kept at random" in result.stdout
    import numpy as np

    assert np.load(tmp_path / "ranked.npy").shape == (4, 28, 28)
    assert np.load(tmp_path / "ranked_labels.npy").tolist() == [8, 8, 0, 0]
    result = run("sample.py", str(trained_tiny_run), "--evaluate", "--n", "20", "--steps", "2",
                 "--clip", str(trained_tiny_clip))
    assert result.returncode == 0 and "CLIP score" in result.stdout


def test_caption_table_draws_captions_of_each_class():
    table = CaptionTable(first=("",))
    labels = torch.arange(10).repeat(50)
    drawn = table.draw(labels, torch.Generator().manual_seed(0))
    assert all(table.prompts[i] in prompts_for(torch.tensor([c] * 32))
               for i, c in zip(drawn.tolist(), labels.tolist()))
    assert table.prompts[0] == "" and len(set(drawn.tolist())) > 200


# -- stage 3 on our CLIP --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_run_on_our_clip(tmp_path_factory, trained_tiny_clip, trained_tiny_autoencoder):
    return train.train(tiny_config(tmp_path_factory.mktemp("runs") / "text_clip", TINY_TEXT,
                                   autoencoder={"source": str(trained_tiny_autoencoder)},
                                   text_encoder={"source": str(trained_tiny_clip)}))


def test_text_stage_on_our_frozen_clip_exports_a_pipeline(text_run_on_our_clip, trained_tiny_clip):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    final = text_run_on_our_clip / "final"
    tower = load_file(final / "text_encoder" / "model.safetensors")
    clip = load_file(trained_tiny_clip / "final" / "model.safetensors")
    assert tower.keys() <= clip.keys() and all(torch.equal(tower[k], clip[k]) for k in tower)  # frozen
    assert json.loads((final / "model_index.json").read_text())["text_encoder"] == ["transformers", "CLIPTextModel"]
    pipe = StableDiffusionPipeline.from_pretrained(final, safety_checker=None, local_files_only=True)
    out = pipe("an ankle boot", negative_prompt="a sandal", num_inference_steps=2, guidance_scale=3.0,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape[:3] == (1, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_text_encoder_run_without_a_final_model_is_one_clear_error(tmp_path, trained_tiny_autoencoder):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.yaml").write_text("stage: clip\n")
    one_line_error(run("train.py", str(TINY_TEXT), f"train.output_dir={tmp_path / 'text'}",
                       f"autoencoder.source={trained_tiny_autoencoder}", f"text_encoder.source={tmp_path / 'clip'}"),
                   "has no final/ model yet")


# -- the words: pretrained word embeddings and word dropout ----------------------------------------


def test_pretrained_word_embeddings_put_a_word_near_its_synonyms():
    words = ["boot", "boots", "trousers", "pants", "sandal", "sandals", "dress", "bag", "coat", "sweater"]
    table = F.normalize(pretrained_word_embeddings(words, width=8), dim=-1)
    cos = table @ table.T
    for a, b in (("boot", "boots"), ("trousers", "pants"), ("sandal", "sandals")):
        i, j = words.index(a), words.index(b)
        others = [cos[i, k] for k in range(len(words)) if k not in (i, j)]
        assert cos[i, j] > max(others), (a, b)


def test_minilm_word_embeddings_come_from_the_cache_and_stay_frozen(tmp_path, monkeypatch):
    stage, _, _ = load_config(apply_overrides(read_yaml(TINY_CLIP), ["model.word_embeddings=minilm"]))
    tokenizer = stage.tokenizer()
    monkeypatch.setenv("SDSTEPS_CACHE", str(tmp_path))
    fake = torch.randn(len(tokenizer), 16)  # what pretrained_word_embeddings would have written (minutes)
    save_tensors({"embeddings": fake}, tmp_path / f"clip-word-embeddings-minilm-{len(tokenizer)}x16.safetensors")
    model = stage.build_model()
    table = model.text_model.embeddings.token_embedding.weight
    assert torch.equal(table, fake * 0.02) and not table.requires_grad
    assert all(p is not table for group in train.parameter_groups(model, 0.1) for p in group["params"])


def test_word_dropout_keeps_each_captions_noun(fashion_mnist):
    stage, _, _ = load_config(apply_overrides(read_yaml(TINY_CLIP), ["captions.word_dropout=0.5"]))
    raw = stage.load_data()
    batch = stage.make_batch({k: v[:64] for k, v in raw.items()}, torch.Generator().manual_seed(0))
    texts = stage.tokenizer().batch_decode(batch["input_ids"], skip_special_tokens=True)
    table = stage.captions
    shorter = 0
    for text, label in zip(texts, batch["labels"].tolist()):
        words = text.replace(" - ", "-").split()  # the decoder spaces out t - shirt
        first = int(table.starts[label])
        # one of the class's captions with words left out, its noun among those left
        fits = [table.prompts[i].split() for i in range(first, first + int(table.counts[label]))
                if is_subsequence(words, table.prompts[i].split())
                and table.prompts[i].split()[stage._nouns[i]] in words]
        assert fits, text
        shorter += len(words) < min(len(c) for c in fits)
    assert shorter > 32  # most captions lost a word


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(word in it for word in short)


def test_clip_on_attribute_captions(tmp_path, fashion_mnist):
    """Attribute captions with word dropout: each caption names only its image's bins (what is left
    of them after dropout), and evaluation adds attribute zero-shot accuracy and recall."""
    run_dir = train.train(tiny_config(tmp_path / "clip", TINY_CLIP, captions={
        "attributes": ["brightness", "size", "texture"], "word_dropout": 0.3}))
    stage, _, _ = load_run(run_dir)
    data = stage.load_data()
    batch = stage.make_batch({k: v[:64] for k, v in data.items()}, torch.Generator().manual_seed(0))
    named, bins = batch["named"], batch["attributes"]
    assert ((named < 0) | (named == bins)).all() and (named >= 0).sum() > 30
    report = stage.evaluate(stage.load_model(run_dir / "final"), 200)
    assert {"eval_attribute_brightness", "eval_attribute_size", "eval_attribute_texture", "eval_attribute_held_out",
            "eval_attribute_text_to_image_r1", "eval_attribute_text_to_image_r5"} <= set(report)


# -- our text tower aligned with a locked sentence encoder (model.align) --------------------------


def test_alignment_loss_compares_cosines_so_a_rotation_costs_nothing():
    torch.manual_seed(0)
    theirs = torch.randn(12, 8)
    rotation = torch.linalg.qr(torch.randn(8, 8)).Q
    assert alignment_loss(theirs @ rotation, theirs) < 1e-10
    assert alignment_loss(3 * theirs, theirs) < 1e-10  # lengths do not count
    assert alignment_loss(torch.randn(12, 8), theirs) > 0.05


def test_aligned_batch_and_the_tower_learns_the_locked_encoders_cosines(fashion_mnist):
    """Phrases of vocabulary words follow the captions; each text's target is the locked encoder's
    embedding of it (a caption with words dropped: of the whole caption); a few steps move the
    trained tower's cosines towards the locked encoder's."""
    stage = tiny_stage(TINY_ALIGNED_CLIP, "model.align.weight=10", "captions.word_dropout=0.5")
    raw = stage.load_data()
    raw = {k: v[:16] for k, v in raw.items()}
    batch = stage.make_batch(raw, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape[0] == batch["align_targets"].shape[0] == 16 + 8
    texts = stage.tokenizer().batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("a photo of a ") for t in texts[16:]) and len(set(texts[16:])) > 1
    encoder = stage.sentence_encoder()
    torch.testing.assert_close(batch["align_targets"][16:], encoder.sentence_embeds(texts[16:]))
    assert any(text not in stage._sentences for text in texts[:16])  # captions with words dropped...
    whole = torch.stack(list(stage._sentences.values()))  # ...and every caption's target a whole caption's
    assert all((row == whole).all(1).any() for row in batch["align_targets"][:16])

    torch.manual_seed(0)
    model = stage.build_model()
    optimizer = torch.optim.AdamW(train.parameter_groups(model, 0.0), lr=3e-3)

    def misalignment():
        pooled = model.text_model(input_ids=batch["input_ids"]).pooler_output
        return alignment_loss(pooled, batch["align_targets"]).item()

    before = misalignment()
    for _ in range(40):
        loss = stage.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert misalignment() < before / 2


def test_resume_continues_an_aligned_run_exactly(tmp_path, fashion_mnist):
    straight = train.train(tiny_config(tmp_path / "straight", TINY_ALIGNED_CLIP))
    assert_resume_is_exact(straight, tmp_path / "resumed")


@pytest.mark.parametrize("align, message", [
    ("{phrases: 65, words: 64}", "0 < phrases <= words"),
    ("{weight: 0}", "weight > 0"),
    ("{encoder: no/such/folder}", "no/such/folder"),
])
def test_bad_alignment_settings_are_one_clear_error(align, message, fashion_mnist):
    with pytest.raises(UserError, match=re.escape(message)):
        tiny_stage(TINY_CLIP, f"model.align={align}").load_data()
