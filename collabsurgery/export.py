"""Export one head as a plain backbone in safetensors, and load it back.

The file holds exactly the keys of the unmodified model's ``state_dict()`` and string metadata:

====================  =========================================================
``format``            ``collabsurgery.backbone/1`` (how we recognise our files)
``architecture``      factory name (``resnet50``; torchvision names without prefix)
``library``           ``timm``, ``torchvision`` or ``module``
``model_kwargs``      factory keyword arguments, JSON
``head``              index of the exported head in the training graph
``version``           collabsurgery version
``recipe``/``metrics`` JSON, when exported from a training run
====================  =========================================================

Files are written atomically: to a temporary file beside the target, then renamed.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__, backbones
from .errors import UserError

FORMAT = "collabsurgery.backbone/1"


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str]) -> Path:
    """``save_file`` to a temp file in the target directory, then rename over ``path``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; valid: a file path such as "
                        f"{path / 'backbone.safetensors'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # parent is a file, no permission, ...
        raise UserError(f"cannot write {path} ({err.strerror or err}); valid: a path in a "
                        "writable directory") from None
    os.close(fd)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def export(net: nn.Module, head: int = 0, path: str | os.PathLike = "backbone.safetensors",
           extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write head ``head`` of training graph ``net`` as a plain backbone; returns the path.

    Only ``net.head_state_dict(head)`` is written (nothing an objective owns), with
    ``net.head_spec(head)`` as the architecture: peers export each as its own.
    """
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < net.num_heads:
        raise UserError(f"head {head!r} out of range; valid: 0..{net.num_heads - 1}")
    spec = net.head_spec(head)
    metadata = {
        "format": FORMAT,
        "architecture": spec.name,
        "library": spec.library,
        "model_kwargs": spec.kwargs_json(),
        "head": str(head),
        "version": __version__,
    }
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return save_safetensors_atomic(net.head_state_dict(head), path, metadata)


def read_metadata(path: str | os.PathLike, expected_format: str = FORMAT,
                  valid: str = "a file written by collabsurgery export") -> dict[str, str]:
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
    """All tensors of a safetensors file, with a UserError if it is truncated or corrupt."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} could not be read ({err}); the file is truncated or corrupt") \
            from None


def load_backbone(path: str | os.PathLike, model: nn.Module | None = None,
                  **model_kwargs: Any) -> nn.Module:
    """Rebuild the unmodified backbone from an export's metadata and load it strictly.

    ``model`` loads into a given module instead (required for exports of a ready module);
    ``model_kwargs`` override the recorded factory arguments.
    """
    metadata = read_metadata(path)
    state = load_state(path)
    if model is None:
        if metadata["library"] not in ("timm", "torchvision"):
            raise UserError(f"{path} was exported from a ready module; pass model= to load it")
        kwargs = {**json.loads(metadata["model_kwargs"]), **model_kwargs}
        model = backbones.create(backbones.BackboneSpec(metadata["library"],
                                                        metadata["architecture"], kwargs))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UserError(f"{path} does not fit the model: {' '.join(first[:2])}") from None
    return model.eval()
