"""Our CLIP: image and text towers trained together with a contrastive loss on Fashion-MNIST's captions.

Its text tower is a frozen encoder for ``conditioning/text``; the pair scores samples against their prompts
(the CLIP score) and ranks candidates (``stage.py``).
"""
