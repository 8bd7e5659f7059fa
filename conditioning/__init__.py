"""Stage 3: conditions beyond the class label, on stage 2's latents (builds on ``ddpm`` and ``latent``).

- ``text/``: prompts through a frozen text encoder, cross-attention, caption dropout, negative and composed
  prompts, attribute captions: what stage 3 adds to stage 2;
- ``clip/``: our own CLIP, trained here: a text tower for ``text/`` and a judge of image-text agreement;
- ``image/``: an image as a further condition, concatenated to the latents: super-resolution, inpainting,
  structure;
- ``finetune/``: a finished text run taught a new subject, DreamBooth, whole or with LoRA adapters.

``examples/`` holds the input images the README's commands use, ``subjects/`` DreamBooth's subject.
"""
