"""What the image-conditioned stages share: stage 3 with extra input channels.

    upscale.py     x4 super-resolution: the low-resolution image        1 channel  (+ its noise level)
    inpaint.py     inpainting: the mask and the masked image's latents  1 + 4 channels
    structure.py   structure-to-image: an edge map of the garment       1 channel

What changes from stage 3 is the UNet's first convolution. The noisy latents z_t (C x 8 x 8)
are concatenated with the image condition, K more channels on the same 8 x 8 grid, so the
UNet reads (C + K) x 8 x 8 and still predicts C x 8 x 8 of noise:

    eps_hat = UNet(concat[z_t, image condition], t, text)

The prompt, caption dropout and classifier-free guidance are stage 3's; the image condition is
the same in both CFG branches, so guidance pulls toward the prompt, never away from the image.

``init_from`` starts the UNet from a finished text run (``FromTextRun``, ``conditioning/finetune/start.py``):
its weights are copied, and the new input channels' weights (and a class embedding the text run lacks)
start at zero, so the widened UNet first computes exactly what the text run did, and training teaches
it to look at the new channels. Each stage writes ``final/`` as the diffusers pipeline that runs it
expects (``pipeline_class``) and draws its random inputs at sampling time in that pipeline's
order (``sampling_inputs``), so the pipeline gives the images ``sample.py`` gives for a seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

from ddpm.data import load_fashion_mnist, load_training_set
from ddpm.diffusion_stage import DiffusionStage, NetworkInputs
from ddpm.errors import UserError
from ddpm.evaluate import markdown_table
from ddpm.metrics import balanced_subset
from ddpm.plots import save_grid
from ddpm.run_folder import load_trained

from conditioning.text.stage import Prompt, TextConditionedLDM, TextDDPMConfig

NETWORK_INPUTS = ("concat", "class_labels")  # the batch entries an image condition gives the network


@dataclasses.dataclass
class ImageConditionedConfig(TextDDPMConfig):
    init_from: str | None = None  # a finished text run to start the UNet from; null: from scratch


class ImageChannels(Prompt):
    """A prompt plus ``extra_channels`` of image condition; a subclass says what they hold."""

    extra_channels: ClassVar[int]

    # -- training: the image condition of each example ----------------------------------------

    def load_data(self) -> dict[str, torch.Tensor]:
        """Stage 3's captions, and the images the condition is made from."""
        return {**super().load_data(), "images": load_training_set(self.config.data)["images"]}

    def batch_entries(self, raw, dropped, flip, generator) -> dict[str, torch.Tensor]:
        """The prompt's entries, then ``image_condition``'s."""
        return {**super().batch_entries(raw, dropped, flip, generator), **self.image_condition(raw, flip, generator)}

    def image_condition(self, raw: dict[str, torch.Tensor], flip: torch.Tensor | None,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Batch entries made from each example's image, mirrored where ``flip`` as x0 is (the
        low-resolution image, mask or structure map)."""
        raise NotImplementedError

    def model_condition(self, batch) -> NetworkInputs:
        return {**super().model_condition(batch), **{k: batch[k] for k in NETWORK_INPUTS if k in batch}}

    # -- sampling: prompts or classes, and the input image -----------------------------------------

    def input_condition(self, inputs: dict[str, torch.Tensor] | None, n: int) -> NetworkInputs:
        """The user's input images (``sample.py``'s flags, N first) -> condition entries (N first)
        that ``sampling_inputs`` turns into what the network takes."""
        raise NotImplementedError

    def require(self, inputs: dict[str, torch.Tensor] | None, *keys: str) -> list[torch.Tensor]:
        """``inputs[key]`` for each key, or one clear error naming the missing input."""
        missing = [k for k in keys if not inputs or inputs.get(k) is None]
        if missing:
            can = self.stage.capabilities
            flags = " and ".join(["--init-image"] * can.marks_up_init_image + [i.flag for i in can.inputs])
            raise UserError(f"a '{self.stage.name}' run samples from an input image: give {flags}")
        return [inputs[k] for k in keys]

    @staticmethod
    def with_network_inputs(condition: NetworkInputs, null: NetworkInputs, raw_keys: tuple[str, ...],
                            network: dict[str, torch.Tensor]) -> tuple[NetworkInputs, NetworkInputs]:
        """Both CFG branches with their raw input entries (``raw_keys``) replaced by the same ``network``
        entries ("concat", "class_labels"), as ``sampling_inputs`` returns them."""
        def swap(c: NetworkInputs) -> NetworkInputs:
            return {**{k: v for k, v in c.items() if k not in raw_keys}, **network}

        return swap(condition), swap(null)

    def null_condition(self, condition: NetworkInputs, negative_prompt: str = "") -> NetworkInputs:
        """Stage 3's null prompt, with the same image condition: guidance is toward the prompt only."""
        image_part = {k: v for k, v in condition.items() if k != "encoder_hidden_states"}
        return {**super().null_condition(condition, negative_prompt), **image_part}

    def generate(self, model, labels: torch.Tensor, *, inputs: dict | None = None, phrasings: str = "train",
                 negative_prompt: str = "", **settings) -> torch.Tensor:
        """One image per class label (its class prompt) and input; uint8 N x 28 x 28."""
        condition = {**self.class_condition(labels, phrasings), **self.input_condition(inputs, len(labels))}
        return self.stage.sample(model, condition, self.null_condition(condition, negative_prompt), **settings)

    def generate_prompts(self, model, prompts: list[str], *, inputs: dict | None = None, negative_prompt: str = "",
                         **settings) -> torch.Tensor:
        """One image per prompt and input; uint8 N x 28 x 28."""
        condition = {**self.prompt_condition(prompts), **self.input_condition(inputs, len(prompts))}
        return self.stage.sample(model, condition, self.null_condition(condition, negative_prompt), **settings)

    # -- looking at it: test images in, the model's answers out ----------------------------------

    def test_examples(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n class-balanced test images (uint8 n x 28 x 28, sorted by class) and their labels."""
        test = load_fashion_mnist("test", root=self.config.data.root, hub_name=self.config.data.hub_name)
        index = balanced_subset(test.labels, n, seed)
        return test.images[index], test.labels[index]

    def text_run(self, device) -> tuple[DiffusionStage, torch.nn.Module] | None:
        """(stage, model) of the ``init_from`` text run, what this run is measured against; or None."""
        if not self.config.init_from:
            return None
        return load_trained(TextConditionedLDM, self.config.init_from, device)[:2]

    def inputs_from(self, images: torch.Tensor, **options) -> dict[str, torch.Tensor]:
        """What a real image gives as this stage's input (its low-resolution copy, a mask, a map)."""
        raise NotImplementedError

    def shown_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inputs as uint8 N x 28 x 28 pictures, for grids."""
        raise NotImplementedError

    def baselines(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the model is compared with in preview grids, made without it (bicubic upscaling)."""
        return {}

    def preview(self, model, path: Path, title: str = "") -> Path:
        """Columns: one test image per class; rows: its input, any baselines, the model's answer
        (with its class prompt), the real image."""
        images, labels = self.test_examples(len(self.stage.class_names))
        inputs = self.inputs_from(images)
        rows = {"input": self.shown_inputs(inputs), **self.baselines(inputs),
                "ours": self.generate(model, labels, inputs=inputs), "real": images}
        s = self.config.sample
        return save_grid(torch.stack(list(rows.values())), path, list(rows),
                         title or f"{self.stage.name}: {s.scheduler}, {s.steps} steps, guidance {s.guidance:g}",
                         col_titles=list(self.stage.class_names))

    @staticmethod
    def report_table(report: dict) -> str:
        """``evaluate``'s numbers, named ``eval_<measure>/<method>``, as a Markdown table: a row per
        method, a column per measure."""
        methods: dict[str, dict] = {}
        for key, value in report.items():
            measure, _, method = key.removeprefix("eval_").partition("/")
            if method:
                methods.setdefault(method, {})[measure] = value
        measures = list(dict.fromkeys(m for row in methods.values() for m in row))
        return markdown_table(["", *measures], [[method, *(f"{row[m]:.3f}" if m in row else "-" for m in measures)]
                                                for method, row in methods.items()])
