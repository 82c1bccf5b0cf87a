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
``sha256``            checksum of the tensors and the other metadata, checked on load
====================  =========================================================

Files are written atomically (:mod:`collabsurgery.atomic`). A file with a NaN or an infinity in
any tensor is never written, and a flipped bit is found on load (:mod:`collabsurgery.integrity`).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, backbones
from .atomic import atomic_path
from .errors import UserError
from .integrity import CHECKSUM_KEY, describe_names, non_finite, tensors_sha256

FORMAT = "collabsurgery.backbone/1"


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str]) -> Path:
    """``save_file`` through :func:`~collabsurgery.atomic.atomic_path`, with the checksum of
    tensors and metadata recorded under ``metadata["sha256"]`` (verified by :func:`load_state`)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM_KEY: tensors_sha256(tensors, metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def export(net: nn.Module, head: int = 0, path: str | os.PathLike = "backbone.safetensors",
           extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write head ``head`` of training graph ``net`` as a plain backbone; returns the path.

    Only ``net.head_state_dict(head)`` is written (nothing an objective owns), with
    ``net.head_spec(head)`` as the architecture: peers export each as its own. A head with a
    non-finite tensor is refused.
    """
    from .graphs import TrainingGraph

    if not isinstance(net, TrainingGraph):
        raise UserError(f"export takes a training graph (from collabsurgery.wrap), got "
                        f"{type(net).__name__}; a plain model needs no export: use "
                        "safetensors.torch.save_file(model.state_dict(), path)")
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
    state = net.head_state_dict(head)
    bad = non_finite(state)
    if bad:
        raise UserError(f"head {head} has NaN or infinite values in {len(bad)} tensors "
                        f"({describe_names(bad)}); nothing exported; valid: a head of a run "
                        "that trained without diverging (an earlier checkpoint, or a lower lr)")
    return save_safetensors_atomic(state, path, metadata)


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


def factory_kwargs(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The factory keyword arguments recorded in an export's metadata (UserError if damaged)."""
    try:
        kwargs = json.loads(metadata.get("model_kwargs", "{}"))
    except json.JSONDecodeError:
        kwargs = None
    if not isinstance(kwargs, dict):
        raise UserError(f"{path}: metadata model_kwargs is not a JSON object "
                        f"({metadata['model_kwargs'][:60]!r}); the file is damaged")
    return kwargs


def load_backbone(path: str | os.PathLike, model: nn.Module | None = None, *,
                  features_only: bool = False, out_indices: Sequence[int] | None = None,
                  **model_kwargs: Any) -> nn.Module:
    """Rebuild the unmodified backbone from an export's metadata and load it strictly.

    ``model`` loads into a given module instead (required for exports of a ready module);
    ``model_kwargs`` override the recorded factory arguments. ``features_only=True`` returns
    the backbone without its classifier as a feature extractor (``forward(x)`` -> list of maps,
    ``feature_info``; ``out_indices`` picks the levels): see :mod:`collabsurgery.features`.
    """
    if features_only:
        from .features import load_features

        if model is not None:
            raise UserError("features_only rebuilds the model from the export's metadata; "
                            "pass either model= or features_only=True, not both")
        return load_features(path, out_indices, **model_kwargs)
    if out_indices is not None:
        raise UserError("out_indices needs features_only=True")
    metadata = read_metadata(path)
    state = load_state(path)
    if model is None:
        library, name = metadata.get("library"), metadata.get("architecture", "")
        if library == "module":
            raise UserError(f"{path} was exported from a ready module; pass model= to load it")
        if library not in ("timm", "torchvision"):
            raise UserError(f"{path}: metadata library is {library!r}; valid: timm or "
                            "torchvision (or pass model= to load into your own module)")
        kwargs = {**factory_kwargs(Path(path), metadata), **model_kwargs}
        prefix = backbones.TORCHVISION_PREFIX if library == "torchvision" else ""
        spec = backbones.parse_model_name(prefix + name, kwargs)  # UserError: unknown name
        model = backbones.create(spec)
    # the module versions of the code that loads it, as a state_dict() of its own would carry
    # (torchvision's MNASNet refuses a state without them)
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UserError(f"{path} does not fit the model: {' '.join(first[:2])}") from None
    return model.eval()
