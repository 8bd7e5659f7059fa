"""A new subject from a few pictures: DreamBooth on a finished text run.

``dreambooth.py`` fine-tunes the whole UNet or, with ``lora.py``, rank-r adapters only (saved in diffusers'
LoRA format), with prior preservation; ``subject.py`` picks the shipped subject and measures likeness.
"""
