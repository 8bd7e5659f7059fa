"""Crash-safe training checkpoints.

A checkpoint is a folder ``checkpoints/step-00001234/`` holding

    model.safetensors     the trained weights
    ema/                  the EMA model, as a diffusers ``save_pretrained`` folder
    optimizer.pt          optimizer (and fp16 grad-scaler) state: tensors only, read with
                          ``torch.load(weights_only=True)``, which refuses pickled code
    trainer_state.json    step, epoch, LR-schedule position, EMA step, stage name
    manifest.json         every file's size and SHA-256, written last

It is written under a temporary name and renamed into place, so a crash leaves either the
whole checkpoint or none. Loading checks the manifest, so a truncated or half-copied
checkpoint is found; ``resume=latest`` then falls back to the newest good one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError

MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(root: Path, step: int, write_files, keep_last: int, keep_steps=()) -> Path:
    """Write a checkpoint atomically, then delete all but the newest ``keep_last`` and those of ``keep_steps``.

    ``write_files(folder)`` writes the payload into a fresh temporary folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "step": step,
        "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        if old.name not in {checkpoint_name(s) for s in keep_steps}:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(folder: Path) -> None:
    """Raise UserError unless every file the manifest lists is there, whole and unchanged."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{folder} is not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        raise UserError(f"{folder}/{MANIFEST} is corrupt") from None
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"checkpoint {folder} is missing {name}")
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise UserError(f"checkpoint {folder}: {name} is truncated or corrupt")


def latest_good_checkpoint(root: Path, warn=print) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; bad ones are reported and skipped."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder
        except UserError as e:
            warn(f"skipping bad checkpoint: {e}")
    return None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    device = torch.device(device)
    with readable(path):  # safetensors takes "cuda:1" but not "cpu:0" (Accelerate's device on several CPU processes)
        return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))


def tensor_names(path: Path) -> list[str]:
    """The names of a safetensors file's tensors, read without loading them."""
    with readable(path), safe_open(str(path), "pt") as f:
        return list(f.keys())


@contextlib.contextmanager
def readable(path: Path):
    """A safetensors file that cannot be read becomes one UserError naming it."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def weights_file(folder: Path) -> Path:
    """The one safetensors file of a ``save_pretrained`` folder (diffusers and transformers name it differently)."""
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise UserError(f"{folder} should hold one .safetensors file, found {len(found)}")
    return found[0]


def load_torch_state(path: Path) -> dict:
    """Optimizer-style state saved by ``torch.save``; pickled code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not plain tensor state; refusing to load it ({type(e).__name__})") from None
