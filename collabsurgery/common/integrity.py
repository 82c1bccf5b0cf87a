"""Detecting damaged state: checksums of files and of safetensors content, non-finite tensors.

safetensors has no checksum of its own, so a flipped bit in a weight loads silently. Checkpoint
files are hashed whole (the hashes live in the checkpoint's ``state.json``); an export or graph
file carries the SHA-256 of its tensors and other metadata in its own metadata
(:data:`CHECKSUM_KEY`). SHA-256 runs at about 1-2 GB/s on one core, so checking a ResNet-50
export (100 MB) costs about 0.1 s on load and on save (see docs/benchmarks.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import torch

CHECKSUM_KEY = "sha256"
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Hex SHA-256 of every tensor (name, dtype, shape, bytes; sorted by name) and of the
    metadata other than the checksum itself."""
    digest = hashlib.sha256()
    header = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def describe_names(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a short list for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
