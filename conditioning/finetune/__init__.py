"""Fine-tunes, as recipes a stage applies (``ddpm.diffusion_stage.Recipe``): how it starts and trains
other than from scratch on its own data.

``start.py`` starts from a finished text run (the image stages, DreamBooth); ``dreambooth.py`` teaches it
a new subject from a few pictures, with prior preservation and a learnt identifier; ``lora.py`` trains
rank-r adapters only (saved in diffusers' LoRA format); ``subject.py`` picks the shipped subject and
measures likeness.
"""
