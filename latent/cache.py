"""Encode the training set once, keep the latents on disk, and measure the scaling factor.

The autoencoder is frozen while the diffusion model trains, so encoding every batch again
at every step would repeat the same work thousands of times. We encode each training image
once (and its mirror image, so flips stay a free augmentation) and store the result as
safetensors in the autoencoder's cache folder.

What we store is the posterior *mean*, not a sample of the posterior. With the tiny KL weight
that latent-diffusion autoencoders train with, the posterior's std is a tiny fraction of the
latents' spread (the build prints the ratio: 0.0006 for configs/autoencoder_fashion_quick.yaml),
so a sample is the mean plus noise far below anything the diffusion model resolves; the mean
makes the cache deterministic and the scaling factor exactly reproducible. A deterministic autoencoder such as TAESD has only
the one latent anyway.

The file name is a fingerprint of everything the latents depend on: the autoencoder's
weights and config, the image size it is fed, and the images. Change any of them and the
next run encodes again; a damaged cache file is rebuilt.

The scaling factor is 1 / std over all cached latent values, so the scaled latents have
std 1; with ``autoencoder.per_channel`` each channel's mean and std normalise that channel
(``latent/space.py``). The statistics travel in the cache file's metadata, the factors in the
autoencoder saved with a latent run (``final/vae``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ddpm.checkpoint import load_tensors, save_tensors
from ddpm.errors import UserError

from .space import LatentSpace


def fingerprint(space: LatentSpace, images: torch.Tensor, flip: bool) -> str:
    """sha256 of the autoencoder's weights and config, its input size, the images and ``flip``."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(space.vae.config), sort_keys=True, default=str).encode())
    h.update(f"image_size={space.image_size} flip={flip} n={len(images)}".encode())
    for name, tensor in sorted(space.vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(images.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"latents-{key[:16]}.safetensors"


def read_scaling_factor(path: Path) -> float | None:
    """The factor stored in a cache file's header (None if the file is missing or damaged)."""
    try:
        with safe_open(str(path), "pt") as f:
            return float(json.loads(f.metadata()["stats"])["scaling_factor"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError):
        return None


def latent_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean and std of N x C x h x w latents, and the scaling factor 1 / std."""
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"scaling_factor": 1.0 / latents.std().item(),
            "channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist()}


def load_or_build(space: LatentSpace, images: torch.Tensor, cache_dir: Path, flip: bool = True,
                  batch_size: int = 256, say=print) -> dict[str, torch.Tensor]:
    """Unscaled latents of ``images`` (uint8 N x 28 x 28): ``latents`` N x C x h x w and, with
    ``flip``, ``latents_flipped`` of the mirrored images, from the cache or freshly encoded.

    Sets the space's normalisation from the cached statistics (``LatentSpace.measure``).
    """
    path = cache_path(cache_dir, fingerprint(space, images, flip))
    cached = None
    if path.is_file():
        try:
            cached = load_tensors(path)
            with safe_open(str(path), "pt") as f:
                stats = json.loads(f.metadata()["stats"])
            say(f"latent cache: {path}")
        except (UserError, SafetensorError, KeyError, TypeError, ValueError) as e:
            say(f"latent cache {path} is damaged ({type(e).__name__}); encoding again")
            cached = None
    if cached is None:
        cached = encode_all(space, images, flip, batch_size)
        posterior_std = cached.pop("posterior_std", None)
        stats = latent_stats(torch.cat(list(cached.values())))
        if posterior_std is not None:
            stats["posterior_std_ratio"] = posterior_std.mean().item() * stats["scaling_factor"]
        _save_atomically(cached, path, {"stats": json.dumps(stats)})
        say(f"latent cache: encoded {len(images)} images{' and their mirror images' if flip else ''} -> {path}")
    space.measure(stats)
    say(describe(stats, space))
    return cached


def encode_all(space: LatentSpace, images: torch.Tensor, flip: bool, batch_size: int) -> dict[str, torch.Tensor]:
    """Encode in batches with a progress bar; for a KL autoencoder also keep the posterior std."""
    out = {"latents": [], "latents_flipped": [], "posterior_std": []}
    for chunk in tqdm(images.split(batch_size), desc="encoding", leave=False):
        mean, std = space.posterior(chunk)
        out["latents"].append(mean.cpu())
        if std is not None:
            out["posterior_std"].append(std.mean(dim=(1, 2, 3)).cpu())
        if flip:
            out["latents_flipped"].append(space.encode_unscaled(chunk, torch.ones(len(chunk), dtype=torch.bool)).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def describe(stats: dict, space: LatentSpace) -> str:
    means = ", ".join(f"{m:+.3f}" for m in stats["channel_mean"])
    stds = ", ".join(f"{s:.3f}" for s in stats["channel_std"])
    own = space.vae.config.get("scaling_factor")
    line = (f"latents {'x'.join(map(str, space.latent_shape))}: per-channel mean [{means}], std [{stds}]; "
            f"scaling factor 1/std = {stats['scaling_factor']:.5f} (the autoencoder's config says {own})"
            + ("; each channel normalised by its own mean and std" if space.per_channel else ""))
    if "posterior_std_ratio" in stats:
        line += f"; posterior std / latent std = {stats['posterior_std_ratio']:.4f}"
    return line


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_tensors(tensors, tmp, metadata)
    os.replace(tmp, path)

