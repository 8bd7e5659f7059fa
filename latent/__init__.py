"""Stage 2: diffusion on the latents of an autoencoder (builds on ``ddpm``)."""
