"""Our CLIP with a locked pretrained text tower (conditioning/clip/towers.py): only the image side
trains; the locked tower is in neither the optimizer nor a checkpoint; the saved folder gives the
same embeddings; two processes train as one; a text run takes the tower from the CLIP run; the
augmentation keeps images whole."""

import re

import pytest
import torch
from safetensors.torch import load_file

import train
from conditioning.clip.stage import random_shift
from conditioning.clip.towers import LockedTextClip
from conditioning.text.encoder import MINILM_PACKAGE, resolve_source
from ddpm.config import apply_overrides, read_yaml
from ddpm.errors import UserError
from ddpm.runs import load_config, load_run, load_scorer

from .conftest import TINY_LOCKED_CLIP, assert_resume_is_exact, assert_two_processes_train_like_one


def locked_stage(*overrides: str):
    stage, _, _ = load_config(apply_overrides(read_yaml(TINY_LOCKED_CLIP), list(overrides)))
    return stage


@pytest.mark.parametrize("image_tower", ["conv", "vit"])
def test_only_the_image_side_learns(fashion_mnist, image_tower):
    vit = "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}"
    overrides = [] if image_tower == "conv" else ["model.image_tower=vit", f"model.vision={vit}"]
    stage = locked_stage(*overrides)
    raw = stage.load_data()
    batch = stage.make_batch({k: v[:32] for k, v in raw.items()}, torch.Generator().manual_seed(0))
    assert batch["sentence_embeds"].shape == (32, 384) and "input_ids" not in batch
    model = stage.build_model()
    stage.loss(model, batch).backward()
    assert all(p.grad is not None for p in model.parameters())
    encoder = stage.sentence_encoder().model
    assert not any(p.requires_grad or p.grad is not None for p in encoder.parameters())
    trained = {id(p) for group in train.parameter_groups(model, 0.1) for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()} and not trained & {id(p) for p in encoder.parameters()}
    # the text head starts as the identity: a caption's embedding is the locked tower's own
    assert torch.equal(model.text_features(batch["sentence_embeds"]), batch["sentence_embeds"])
    # each training caption's embedding is the locked tower's, mean-pooled over its tokens
    texts = stage.captions.prompts[:3]
    assert torch.allclose(torch.stack([stage._sentences[t] for t in texts]),
                          stage.sentence_encoder().sentence_embeds(texts))


def test_the_locked_tower_is_in_no_checkpoint(trained_tiny_locked_clip):
    stage, _, _ = load_run(trained_tiny_locked_clip)
    trained = set(stage.build_model().state_dict())
    checkpoint = trained_tiny_locked_clip / "checkpoints" / "step-00000006"
    for weights in (checkpoint / "model.safetensors", checkpoint / "ema" / "model.safetensors",
                    trained_tiny_locked_clip / "final" / "model.safetensors"):
        assert set(load_file(weights)) == trained
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(list(stage.build_model().parameters()))


def test_saved_folder_gives_the_same_embeddings(trained_tiny_locked_clip, fashion_mnist, tmp_path):
    stage, _, _ = load_run(trained_tiny_locked_clip)
    model = stage.load_model(trained_tiny_locked_clip / "final")
    assert isinstance(model, LockedTextClip) and model.locked_text_tower == MINILM_PACKAGE
    stage.save_final(model, tmp_path / "again")
    again = LockedTextClip.from_pretrained(tmp_path / "again", local_files_only=True)
    prompts = ["a photo of a coat", "a catalogue shot of a thick parka", "flip-flops for the summer"]
    images = fashion_mnist.images[:8]
    first, second = stage.scorer(model), load_scorer(trained_tiny_locked_clip)
    assert torch.equal(first.similarity(images, prompts), stage.scorer(again).similarity(images, prompts))
    assert torch.allclose(first.similarity(images, prompts), second.similarity(images, prompts))


def test_resume_continues_the_same_locked_run_exactly(trained_tiny_locked_clip, tmp_path):
    assert_resume_is_exact(trained_tiny_locked_clip, tmp_path / "resumed")


def test_two_processes_train_the_locked_clip_like_one(tmp_path, fashion_mnist):
    """The conv tower normalises each image by itself (group norm): with the judge's batch norm each
    process would normalise by its own half batch, and the runs would differ."""
    assert_two_processes_train_like_one(tmp_path, TINY_LOCKED_CLIP)


def test_a_text_run_takes_the_locked_tower_from_the_clip_run(trained_tiny_locked_clip):
    assert resolve_source(str(trained_tiny_locked_clip)) == resolve_source(MINILM_PACKAGE)


@pytest.mark.parametrize("overrides, message", [
    (["model.locked_text_tower=null", "model.projection_dim=16"],
     "model.image_tower: conv needs model.locked_text_tower"),
    (["captions.word_dropout=0.3"], "a locked one learns nothing from it"),
    (["model.text={hidden_size: 16}"], "model.text configures a trained text tower"),
    (["model.vision={patch_size: 4}"], "unknown key model.patch_size"),
    (["data.shift=14"], "data.shift must be in [0, 14)"),
    (["model.align={}"], "model.align teaches a trained text tower"),
])
def test_bad_locked_configs_are_one_clear_error(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        locked_stage(*overrides)


def test_projection_width_must_be_the_locked_towers(fashion_mnist):
    with pytest.raises(UserError, match="model.projection_dim is its width, 384"):
        locked_stage("model.projection_dim=128").build_model()


def test_random_shift_moves_each_image_whole_within_the_bound():
    images = torch.zeros(500, 28, 28, dtype=torch.uint8)
    images[:, 13, 13] = 255
    moved = random_shift(images, 2, torch.Generator().manual_seed(0))
    where = moved.flatten(1).argmax(1)
    dy, dx = where // 28 - 13, where % 28 - 13
    assert (moved.flatten(1).sum(1) == 255).all()  # the one bright pixel, nothing else
    assert set(dy.tolist()) == set(dx.tolist()) == {-2, -1, 0, 1, 2}
    assert torch.equal(random_shift(images, 2, torch.Generator().manual_seed(0)), moved)
    edge = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    out = random_shift(edge.expand(200, 28, 28), 1, torch.Generator().manual_seed(1))
    assert (out == 0).flatten(1).any(1).float().mean() > 0.5  # moved images bring black in at the border

