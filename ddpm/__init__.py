"""Stage 1: class-conditioned DDPM on Fashion-MNIST, and the pieces every stage shares
(config files, EMA, checkpoints, image grids)."""
