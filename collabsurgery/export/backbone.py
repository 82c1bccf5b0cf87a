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

Files are written atomically (:mod:`collabsurgery.common.atomic`). A file with a NaN or an infinity in
any tensor is never written, and a flipped bit is found on load (:mod:`collabsurgery.common.integrity`).
A full disk is one line (:class:`~collabsurgery.common.diskfull.DiskFull`) and leaves nothing.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch.nn as nn

from collabsurgery.common import __version__
from collabsurgery.common.diskfull import refuse_when_full, tensor_bytes
from collabsurgery.common.integrity import describe_names, non_finite
from collabsurgery.common.tensorfile import load_state, read_metadata, save_safetensors_atomic
from collabsurgery.errors import UserError
from collabsurgery.models import backbones

FORMAT = "collabsurgery.backbone/1"
VALID = "a file written by collabsurgery export"


def export_metadata(path: str | os.PathLike, valid: str = VALID) -> dict[str, str]:
    """Metadata of one of our backbone exports; a UserError naming what is valid otherwise."""
    return read_metadata(path, FORMAT, valid)


def export(net: nn.Module, head: int = 0, path: str | os.PathLike = "backbone.safetensors",
           extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write head ``head`` of training graph ``net`` as a plain backbone; returns the path.

    Only ``net.head_state_dict(head)`` is written (nothing an objective owns), with
    ``net.head_spec(head)`` as the architecture: peers export each as its own. A head with a
    non-finite tensor is refused.
    """
    from collabsurgery.graphs import TrainingGraph

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
    path = Path(path)
    with refuse_when_full(f"export {path.name}", path.parent, tensor_bytes(state) + 64 * 1024):
        return save_safetensors_atomic(state, path, metadata)






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


def load_plain(path: str | os.PathLike, model: nn.Module | None = None,
               **model_kwargs: Any) -> nn.Module:
    """The whole backbone of an export, rebuilt from its metadata (or ``model``), loaded
    strictly, in eval mode (see :func:`collabsurgery.export.load_backbone`)."""
    metadata = export_metadata(path)
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
