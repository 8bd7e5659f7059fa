"""Stage 1, class-conditioned DDPM on Fashion-MNIST (``stage.py``, the maths in ``diffusion.py``),
and what every stage shares: the stage contract (``contract.py``), the diffusion-stage base
(``diffusion_stage.py``), run loading (``runs.py``), configs, data, checkpoints, EMA, plots, the
judge and its metrics. Later stages import this package; it never imports them."""
