"""Text to image: stage 2's latent diffusion with a prompt instead of a class label.

A caption per training image, a frozen text encoder's hidden states as the condition, cross-attention in the
UNet, the empty prompt as classifier-free guidance's null condition (``stage.py``, ``encoder.py``,
``captions.py``); captions that name measured attributes and how well samples follow them (``attributes.py``,
``adherence.py``).
"""
