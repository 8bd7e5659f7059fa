"""Images as conditions: a finished text run whose UNet reads more input channels.

``stage.py`` widens the first convolution (the new channels' weights start at zero) and concatenates the
condition to the noisy latents; ``upscale.py`` (x4 super-resolution), ``inpaint.py`` (a mask and the masked
picture) and ``structure.py`` (an edge map) are one stage each, each loadable by diffusers' pipeline for it.
"""
