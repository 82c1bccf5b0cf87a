"""Safetensors files with string metadata: written atomically with a checksum, read back
verified. Every file format of collabsurgery (exports, graph files, checkpoints, state files)
is one of these with its own ``format`` metadata value.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from collabsurgery.common.atomic import atomic_path
from collabsurgery.common.integrity import CHECKSUM_KEY, tensors_sha256
from collabsurgery.errors import UserError


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str]) -> Path:
    """``save_file`` through :func:`~collabsurgery.common.atomic.atomic_path`, with the checksum of
    tensors and metadata recorded under ``metadata["sha256"]`` (verified by :func:`load_state`)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM_KEY: tensors_sha256(tensors, metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def read_metadata(path: str | os.PathLike, expected_format: str, valid: str) -> dict[str, str]:
    """Metadata of one of our safetensors files of ``expected_format``; UserError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); "
                        f"valid: {valid}") from None
    if metadata.get("format") != expected_format:
        raise UserError(f"{path} has no format={expected_format} metadata; valid: {valid}")
    return metadata


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a UserError if it is truncated or corrupt, or
    if they do not match the checksum in its metadata (files without one are not checked)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} could not be read ({err}); the file is truncated or corrupt") \
            from None
    if CHECKSUM_KEY in metadata and metadata[CHECKSUM_KEY] != tensors_sha256(tensors, metadata):
        raise UserError(f"{path} is corrupt: its content does not match the checksum written "
                        "with it (a flipped bit or an edit); valid: an intact copy")
    return tensors
