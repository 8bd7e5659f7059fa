"""DreamBooth: teach a trained text-to-image run one new subject from a few pictures (Ruiz et al. 2023).

    python train.py configs/dreambooth_fashion_lora_quick.yaml
    python sample.py runs/dreambooth_fashion_lora_quick --prompt "a photo of a <|spare_0|> bag"
    python sample.py runs/text_fashion_clip_quick --lora runs/dreambooth_fashion_lora_quick/final --prompt ...
    python benchmarks/dreambooth_report.py runs/dreambooth_fashion_quick --clip runs/clip_fashion_quick

What changes from stage 3 is the data and where the weights start. The run starts from a
finished text run (``init_from``: its UNet, frozen text encoder, autoencoder and scheduler; its
config sections are this run's too) and trains on 3-5 pictures of one subject
(``subject.py``), all captioned with one *instance prompt* that binds the subject to a rare
identifier: "a photo of a <|spare_0|> bag". The identifier is one of the tokenizer's spare
tokens, which no ordinary text ever produces, so it starts with no meaning to unlearn.

Trained on four pictures, the model soon forgets that "a bag" means every bag (language drift)
and copies the pictures. *Prior preservation* counters both: before fine-tuning, the frozen
starting model generates ``prior.num_class_images`` images for the *class prompt* ("a photo of a
bag"; at guidance 1, so they are its own conditional distribution, not a sharpened one, which
training on would sharpen every later guided sample further); each step then trains on a batch of
subject images and as many class images,

    batch  = [instance..., class...]                      one forward pass of 2B
    loss   = mean(instance losses) + prior.weight * mean(class losses)

so the model keeps answering the class prompt as it did. Nothing in that loss speaks for the
other classes, and a small UNet fine-tuned long enough to tell "a <|spare_0|> bag" from "a bag"
(our frozen text tower barely does) forgets them too: ``prior.classes: all`` makes class images
for every class's prompt, and the class half of each batch draws from all of them, half of it
from the subject's own class. ``prior.images: dataset`` takes the class images from the training
set instead of the starting model, as many as asked: fine-tuned on 100 images per prompt, the model
drifts on the other classes even with the subject's loss switched off; a prior of thousands keeps
the class half close to the starting run's own training, and ``prior.captions: training`` (a random
training caption of the image's class at every step, not always the class prompt) makes it that
training exactly, every phrasing included.
``lora.rank`` > 0 trains low-rank adapters on the UNet's attention instead of the whole UNet
(``lora.py``).

The prior keeps the other classes but not the class prompt itself: "a photo of a bag" drifts to
the subject too, because the frozen text tower moves "a <|spare_0|> bag" about as far from "a
bag" as an adjective does, and the UNet answers nearby conditions alike. ``subject.learn_identifier``
lets the identifier's word embedding train with the UNet (textual inversion, Gal et al. 2023, the
rest of the text tower frozen): the instance prompt's hidden states are computed at every step
from that vector (``identifier_states``), so the loss can move the word itself away from "bag"
instead of bending the UNet's answer to everything near it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from diffusers import UNet2DConditionModel
from PIL import Image

from ddpm.checkpoint import save_tensors, weights_file
from ddpm.diffusion_stage import DiffusionStage, Recipe
from ddpm.data import class_index, load_fashion_mnist, read_image
from ddpm.errors import UserError
from ddpm.evaluate import cached_judge, evaluate_model
from ddpm.metrics import diversity, embed
from latent.stage import Latents

from conditioning.text.captions import NAMES, TEMPLATES, CaptionTable, class_prompt, with_article
from conditioning.finetune.lora import Lora, LoraSettings
from conditioning.finetune.start import FromTextRun, load_checkpoint, starting_model
from conditioning.text.encoder import LEARNED_EMBEDS
from conditioning.text.stage import Prompt, TextConditionedLDM, TextDDPMConfig
from conditioning.finetune.subject import DEFAULT_SUBJECT, Likeness, read_subject, rest_of_class, subject_class

FROM_BASE = ("model", "autoencoder", "text_encoder", "captions")  # fixed by init_from's weights
INSTANCE_TEMPLATE = "a photo of {}"  # the template of the instance and class prompts
INSTANCE_CAPTION = 1  # the instance prompt's caption id (0 is the empty prompt)

@dataclasses.dataclass
class SubjectConfig:
    images: str = DEFAULT_SUBJECT  # a folder of 28 x 28 PNGs, or a subject shipped in conditioning/subjects/
    class_name: str | None = None  # its Fashion-MNIST class; default: the folder's subject.json
    identifier: str = "<|spare_0|>"  # one token of the tokenizer, bound to the subject by training
    learn_identifier: bool = False  # textual inversion: the identifier's word embedding trains with the UNet


@dataclasses.dataclass
class PriorConfig:
    weight: float = 1.0  # of the class images' loss; 0: no prior preservation
    num_class_images: int = 100  # per class prompt
    images: Literal["generated", "dataset"] = "generated"  # generated: the starting model's answers to the class
    # prompt (the paper; made once, kept in INIT_FROM/class_images/); dataset: real training images of the class
    classes: Literal["subject", "all"] = "subject"  # whose prompts: the subject's class (the paper), or every
    # class (the subject's then makes up half of the class images)
    captions: Literal["class_prompt", "training"] = "class_prompt"  # of each class image: its class prompt (the
    # paper), or at each step a random training caption of its class, as the starting run was trained
    guidance: float = 1.0  # 1: draws from the model's own conditional distribution, the one to preserve
    seed: int = 0

    def __post_init__(self):
        if self.weight < 0 or self.num_class_images <= 0:
            raise UserError("prior.weight must be >= 0 and prior.num_class_images > 0")


@dataclasses.dataclass
class DreamBoothConfig(TextDDPMConfig):
    init_from: str = ""  # a finished text run: runs/text_fashion_clip_quick
    subject: SubjectConfig = dataclasses.field(default_factory=SubjectConfig)
    prior: PriorConfig = dataclasses.field(default_factory=PriorConfig)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)



class SubjectPrompt(Prompt):
    """Stage 3's prompt, with init_from's text encoder, naming the subject: the instance prompt "a photo
    of a <|spare_0|> bag" binds it to the identifier, the class prompt "a photo of a bag" is its class.
    The captions are those two and the prior's class prompts, and with ``subject.learn_identifier`` the
    instance prompt's hidden states come from the identifier's word embedding as it is now."""

    def __init__(self, stage):
        super().__init__(stage)
        s, classes = self.config.subject, stage.class_names
        class_name = s.class_name or subject_class(s.images)
        if class_name is None:
            raise UserError(f"subject.class_name is not set and {s.images} has no subject.json; "
                            f"name the subject's class, e.g. subject.class_name=Bag")
        self.subject_class = classes[class_index(class_name, classes)]
        self.instance_prompt = subject_prompt(INSTANCE_TEMPLATE, s.identifier, self.subject_class)
        self.class_prompt = class_prompt(self.subject_class)
        self.prior_classes = classes if self.config.prior.classes == "all" else [self.subject_class]
        self.prior_prompts = [class_prompt(c) for c in self.prior_classes]
        first = ("", self.instance_prompt, *self.prior_prompts)  # caption ids 0, INSTANCE_CAPTION, 2, ...
        self.captions = CaptionTable(classes, first)  # then every class's captions
        self.training_prompts = self.captions.prompts if self.config.prior.captions == "training" else list(first)

    def text_encoder(self):
        if self._encoder is None:
            self.load(Path(self.config.init_from) / "final")
        return self._encoder

    @functools.cached_property
    def identifier_id(self) -> int:
        return self.check_identifier()

    def check_identifier(self) -> int:
        """The identifier's token id; a UserError if the tokenizer splits it or does not know it."""
        tokenizer = self.text_encoder().tokenizer
        identifier = self.config.subject.identifier
        ids = tokenizer(identifier, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise UserError(f"subject.identifier {identifier!r} is {len(ids)} tokens {pieces} for this run's "
                            f"tokenizer, not one; use a spare token such as <|spare_0|> of a run whose text "
                            f"encoder is our CLIP (configs/text_fashion_clip_quick.yaml)")
        return ids[0]

    def batch_entries(self, raw, dropped, flip, generator) -> dict[str, torch.Tensor]:
        """captions: each row's prompt id (a class row's, with ``prior.captions: training``, a random
        training caption of its class), or 0 (the empty prompt) where dropped."""
        captions = raw["caption"]
        if "label" in raw and self.config.prior.captions == "training":
            captions = self.captions.draw(raw["label"], generator)
        return {"captions": torch.where(dropped, 0, captions)}

    def model_condition(self, batch) -> dict[str, torch.Tensor]:
        """Stage 3's hidden states of each row's caption; with ``subject.learn_identifier`` the
        instance prompt's are those of the identifier's embedding as it is now (``identifier_states``)."""
        condition = super().model_condition(batch)
        if "identifier_states" in batch:
            is_instance = (batch["captions"] == INSTANCE_CAPTION)[:, None, None]
            condition["encoder_hidden_states"] = torch.where(is_instance, batch["identifier_states"],
                                                             condition["encoder_hidden_states"])
        return condition

    def preview_rows(self, n: int):
        """The instance prompt, the same in another phrasing, the class prompt, and every other class."""
        others = [class_prompt(c) for c in self.stage.class_names if c != self.subject_class]
        rows = [self.instance_prompt, subject_prompt("a product photo of {}", self.config.subject.identifier,
                                                     self.subject_class), self.class_prompt, *others]
        return rows, self.prompt_condition([p for p in rows for _ in range(n)])


class StartingLatents(Latents):
    """init_from's autoencoder, with the scaling factor measured for that run."""

    def latent_space(self):
        if self._space is None:
            self.load(Path(self.config.init_from) / "final")
        return self._space


# -- the data: the subject's pictures and the class images -------------------------------------------


class PriorPreservation(Recipe):
    """Train on the subject's pictures (the *instance* half of each batch) and, with ``prior.weight`` > 0,
    as many class images (the *class* half), both in one forward pass:
    loss = mean(instance losses) + prior.weight * mean(class losses)."""

    def load_data(self, stage, then) -> dict[str, torch.Tensor]:
        """N rows, at least one per subject picture and one per class image; row i holds subject
        picture i mod K (its latents, and those of its mirror image) and, with prior preservation,
        class image i mod M with its prompt's caption id."""
        condition = stage.condition
        condition.check_identifier()
        condition.text_encoder().to(PartialState().device)
        condition._table = condition.embed(condition.training_prompts)
        instances = read_subject(stage.config.subject.images)
        halves = {"instance": (instances, torch.arange(len(instances)), torch.ones(len(instances), dtype=torch.long))}
        if has_prior(stage):
            halves["class"] = class_rows(stage)
        n = max(len(which) for _, which, _ in halves.values())
        data = {}
        for half, (images, which, captions) in halves.items():
            data |= rows(stage, half, images, which, captions, n)
        if has_prior(stage):  # the class of each class row's prompt
            classes = torch.tensor([stage.class_names.index(c) for c in condition.prior_classes])
            data["class_label"] = classes[data["class_caption"] - 2]
        return data

    def make_batch(self, stage, then, raw, generator, step=0) -> dict[str, torch.Tensor]:
        """The stage's batch for the subject's pictures and, with prior preservation, another for the
        class images under ``prior_``: B rows each, stacked by ``stacked``."""
        def half(name):
            return {k: raw[f"{name}_{k}"] for k in ("latents", "latents_flipped", "caption", "label")
                    if f"{name}_{k}" in raw}

        batch = then(half("instance"), generator, step)
        if has_prior(stage):
            batch |= {f"prior_{k}": v for k, v in then(half("class"), generator, step).items()}
        return batch

    def loss(self, stage, then, model, batch) -> dict[str, torch.Tensor]:
        """instance_loss + prior.weight * prior_loss, both halves in one forward pass."""
        if not has_prior(stage):
            return {"loss": stage.example_losses(model, batch).mean()}
        losses = stage.example_losses(model, stacked(batch))
        b = len(batch["x0"])
        instance, prior = losses[:b].mean(), losses[b:].mean()
        return {"loss": instance + stage.config.prior.weight * prior, "instance_loss": instance, "prior_loss": prior}

    def save_final(self, stage, then, model, folder: Path) -> None:
        """What the stage saves, with ``dreambooth.json``: the prompts that call the subject up."""
        then(model, folder)
        c = stage.condition
        info = {"init_from": stage.config.init_from, "instance_prompt": c.instance_prompt,
                "class_prompt": c.class_prompt, "identifier": stage.config.subject.identifier,
                "learned_identifier": stage.config.subject.learn_identifier,
                "class": c.subject_class, "lora_rank": stage.config.lora.rank}
        (folder / "dreambooth.json").write_text(json.dumps(info, indent=1) + "\n")


def has_prior(stage) -> bool:
    return stage.config.prior.weight > 0


def stacked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DreamBooth batch of 2B: the instance rows, then the class rows (entries without a class
    half, as the identifier's hidden states, as they are)."""
    return {k: torch.cat([v, batch[f"prior_{k}"]]) if f"prior_{k}" in batch else v
            for k, v in batch.items() if not k.startswith("prior_")}


def class_rows(stage) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The class images, each prompt's once (uint8 U x 28 x 28), and for each of the M class
    rows the index of its image (int64 M) and its prompt's caption id (int64 M). With
    ``prior.classes: all`` the subject's own class has as many rows as all others together: it is
    the class the identifier's prompt is nearly the same as, and drifts first."""
    prompts, class_prompt = stage.condition.prior_prompts, stage.condition.class_prompt
    images, which, captions = [], [], []
    for i, prompt in enumerate(prompts):
        repeat = len(prompts) - 1 if prompt == class_prompt and len(prompts) > 1 else 1
        made = class_images(stage, prompt)
        which.append(torch.arange(len(made)).repeat(repeat) + sum(len(m) for m in images))
        captions.append(torch.full((len(made) * repeat,), 2 + i))
        images.append(made)
    return torch.cat(images), torch.cat(which), torch.cat(captions)


def rows(stage, half: str, images: torch.Tensor, which: torch.Tensor, captions: torch.Tensor, n: int
         ) -> dict[str, torch.Tensor]:
    """``half``_latents (and _latents_flipped), n x C x h x w, and ``half``_caption (int64 n), ids
    into ``training_prompts``: row i is images[which[i mod M]] with caption i mod M. Each image
    is encoded once, however many rows repeat it."""
    space = stage.space.latent_space().to(PartialState().device)
    row = torch.arange(n) % len(which)
    image = which[row]
    return {f"{half}_latents": space.encode(images)[image], f"{half}_latents_flipped": space.encode(
        images.flip(-1))[image], f"{half}_caption": captions[row]}


def class_images(stage, prompt: str) -> torch.Tensor:
    """uint8 num_class_images x 28 x 28: the starting model's answers to ``prompt``, made once
    and kept as PNGs in INIT_FROM/class_images/<prompt and settings>/ (shared by every
    fine-tune of that run that asks for the same ones); with ``prior.images: dataset``, real
    training images of its class instead."""
    p, s, init_from = stage.config.prior, stage.config.sample, Path(stage.config.init_from)
    if p.images == "dataset":
        return training_images_of(stage, stage.condition.prior_classes[stage.condition.prior_prompts.index(prompt)])
    unet = weights_file(init_from / "final" / "unet")  # class images made by other weights are not these:
    weights = hashlib.blake2b(unet.read_bytes(), digest_size=8).hexdigest()
    key = json.dumps([prompt, p.seed, s.scheduler, s.steps, p.guidance, unet.stat().st_size, weights])
    digest = hashlib.blake2b(key.encode(), digest_size=5).hexdigest()
    folder = init_from / "class_images" / f"{prompt.replace(' ', '_').replace('/', '_')}-{digest}"
    paths = [folder / f"{i:04d}.png" for i in range(p.num_class_images)]
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not all(path.is_file() for path in paths):
            print(f"generating {len(paths)} class images for {prompt!r} with {init_from}")
            base = starting_model(stage).to(state.device)
            images = stage.generate_prompts(base, [prompt] * len(paths), guidance=p.guidance, seed=p.seed,
                                            progress=True)
            folder.mkdir(parents=True, exist_ok=True)
            for image, path in zip(images, paths):
                Image.fromarray(image.numpy()).save(path)
            (folder / "prompt.txt").write_text(key + "\n")
    return torch.cat([read_image(path, "class image") for path in paths])


@functools.lru_cache(maxsize=1)
def training_set(root: str | None, hub_name: str | None):
    """The Fashion-MNIST training split, read once for all the prior's classes."""
    return load_fashion_mnist("train", root=root, hub_name=hub_name)


def training_images_of(stage, class_name: str) -> torch.Tensor:
    """uint8 num_class_images x 28 x 28: training images of ``class_name``, drawn with prior.seed."""
    p, train = stage.config.prior, training_set(stage.config.data.root, stage.config.data.hub_name)
    members = (train.labels == stage.class_names.index(class_name)).nonzero().flatten()
    if len(members) < p.num_class_images:
        raise UserError(f"prior.num_class_images={p.num_class_images} but the training set has {len(members)} "
                        f"images of {class_name}; ask for at most that many")
    pick = torch.randperm(len(members), generator=torch.Generator().manual_seed(p.seed))[:p.num_class_images]
    return train.images[members[pick]]


# -- the identifier's word, learnt with the UNet ------------------------------------------------------


class LearntIdentifier(Recipe):
    """With ``subject.learn_identifier``, the identifier's word embedding is a parameter of the model,
    starting from the tokenizer's own, and the instance prompt's hidden states are computed from it at
    every step (``identifier_states``); it is saved beside the UNet (``learned_embeds.safetensors``)."""

    def build_model(self, stage, then):
        model = then()
        if stage.config.subject.learn_identifier:
            encoder, token = stage.condition.text_encoder(), stage.condition.identifier_id
            start = encoder.model.get_input_embeddings().weight[token]
            model.register_parameter("identifier_embedding", torch.nn.Parameter(start.detach().clone()))
        return model

    def loss(self, stage, then, model, batch):
        if stage.config.subject.learn_identifier:
            batch = {**batch, "identifier_states": identifier_states(stage, model)}
        return then(model, batch)

    def preview(self, stage, then, model, path, title=""):
        """The stage's preview; a model in training names the subject with its identifier as it is now."""
        if stage.config.subject.learn_identifier:
            learn_identifier(stage, model)
        return then(model, path, title)

    def save_final(self, stage, then, model, folder: Path) -> None:
        """The learnt word made the text encoder's (so that a saved text encoder names the subject), the
        model saved without it, and {identifier: its vector} in ``learned_embeds.safetensors`` (which
        ``--lora`` loads with the adapters)."""
        if not stage.config.subject.learn_identifier:
            return then(model, folder)
        words = learn_identifier(stage, model)
        model = copy.deepcopy(model)
        del model.identifier_embedding  # unet/ holds the UNet's own weights only
        then(model, folder)
        save_tensors(words, folder / LEARNED_EMBEDS)

    def load_model(self, stage, then, folder: Path):
        """A checkpoint's learnt word becomes the text encoder's (a ``final/`` folder's already is)."""
        if not (stage.config.subject.learn_identifier and (folder / "ema").is_dir()):
            return then(folder)
        model = load_checkpoint(stage, folder)
        learn_identifier(stage, model)
        return model


def identifier_states(stage, model) -> torch.Tensor:
    """float 77 x D: the instance prompt through the frozen text encoder, the identifier's word
    embedding being the model's ``identifier_embedding`` (so its gradient reaches that vector)."""
    vector = extract_model_from_parallel(model).identifier_embedding
    c = stage.condition
    return c.text_encoder().encode_with_word(c.instance_prompt, c.identifier_id, vector)


def learn_identifier(stage, model) -> dict[str, torch.Tensor]:
    """The model's identifier embedding made the text encoder's word; {identifier: vector}."""
    words = {stage.config.subject.identifier: model.identifier_embedding}
    stage.condition.learn_words(words)
    return words


class DreamBoothLDM(DiffusionStage):
    """A subject's prompt in init_from's latent space: init_from's UNet fine-tuned on the subject's
    pictures, whole or through adapters (``lora``), with prior preservation and the identifier learnt
    or not. The recipes apply first to last, each around the ones after it."""

    name = "dreambooth"
    Config = DreamBoothConfig
    capabilities = TextConditionedLDM.capabilities
    Space, Condition, model_class = StartingLatents, SubjectPrompt, UNet2DConditionModel
    recipes = (LearntIdentifier(), PriorPreservation(), Lora(),
               FromTextRun(FROM_BASE, inherited=("data", "diffusion", "sample"), needs=True))


def subject_prompt(template: str, identifier: str, class_name: str) -> str:
    """``template`` filled with "a <identifier> <first name of the class>": "a photo of a <|spare_0|> bag"
    (without an identifier: "a photo of a bag")."""
    noun = NAMES[class_name][0]
    return template.format(" ".join(w for w in (with_article(noun).split(" ", 1)[0], identifier, noun) if w))


# -- measuring a fine-tune ------------------------------------------------------------------------


def subject_likeness(stage: DreamBoothLDM, scorer) -> Likeness:
    """Likeness to the stage's subject pictures and to the rest of their class (judge and ``scorer``)."""
    subject = read_subject(stage.config.subject.images)
    return Likeness(subject, rest_of_class(stage.condition.subject_class, subject), scorer)


def dreambooth_report(stage: DreamBoothLDM, model, likeness: Likeness, n: int = 200, n_classes: int = 1000,
                      seed: int = 0) -> dict[str, float]:
    """The DreamBooth paper's measures, our judge standing in for DINO and our CLIP for CLIP, at the
    run's ``sample`` settings, n samples each (every model measured with the same seeds):

    * subject fidelity: ``subject_*``: how like the subject's pictures the instance prompt's samples
      are (mean cosine, judge features / CLIP image embeddings), against ``rest_*``: how like the
      other test images of the class;
    * prompt fidelity: ``rephrased_*``: the subject in the other training templates ("a product
      photo of a <id> bag"): likeness, and the CLIP score against the prompt without the identifier;
    * prior preservation: ``class_prompt_subject_judge`` and ``class_prompt_subject_rate``: how like the
      subject the plain class prompt's samples are, and how many are the subject (neither should grow);
    * other classes: the judge's accuracy on n_classes samples of every class's prompts, the
      subject's class apart; ``diversity``: mean pairwise judge-feature distance of the subject samples.
    """
    c, identifier = stage.class_names.index(stage.condition.subject_class), stage.config.subject.identifier
    templates = [t for t in TEMPLATES if t != INSTANCE_TEMPLATE]
    rephrased = [templates[i % len(templates)] for i in range(n)]

    def samples(prompts):
        return stage.generate_prompts(model, prompts, seed=seed, progress=True)

    instance = samples([stage.condition.instance_prompt] * n)
    feats, logits = embed(cached_judge(), instance)
    report = likeness(instance)
    report["subject_accuracy"] = (logits.argmax(1) == c).float().mean().item()
    report["diversity"] = diversity(feats, torch.full((n,), c))[0]
    images = samples([subject_prompt(t, identifier, stage.condition.subject_class) for t in rephrased])
    report |= {f"rephrased_{k}": v for k, v in likeness(images).items()}
    report["rephrased_clip_score"] = likeness.scorer.score(images, [subject_prompt(t, "", stage.condition.subject_class)
                                                           for t in rephrased]).mean().item()
    class_prompt = likeness(samples([stage.condition.class_prompt] * n))
    report |= {"class_prompt_subject_judge": class_prompt["judge_subject"],
               "class_prompt_subject_rate": class_prompt["subject_rate"]}
    per_class = evaluate_model(stage, model, n_classes, seed=seed, progress=True)["per_class_accuracy"]
    report["class_accuracy"] = per_class[c]
    report["other_classes_accuracy"] = sum(a for i, a in enumerate(per_class) if i != c) / (len(per_class) - 1)
    return report
