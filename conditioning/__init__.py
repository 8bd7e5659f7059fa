"""Stage 3: text conditioning with a frozen text encoder (builds on ``ddpm`` and ``latent``)."""
