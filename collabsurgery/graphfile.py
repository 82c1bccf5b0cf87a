"""A whole training graph in one safetensors file, with the arguments that rebuild it.

``collabsurgery wrap ... --save graph.safetensors`` writes one; ``collabsurgery export`` reads it
(or a training run directory) and writes a single head as a plain backbone.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .errors import UserError
from .export import load_state, read_metadata, save_safetensors_atomic
from .graphs import TreeNet, WrapConfig, rebuild

FORMAT = "collabsurgery.graph/1"


def config_to_json(config: WrapConfig) -> str:
    """WrapConfig as JSON (tuples become lists)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> WrapConfig:
    """Inverse of :func:`config_to_json`."""
    raw = json.loads(text)
    for key in ("split", "branches", "input_size"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    return WrapConfig(**raw)


def save_graph(net: TreeNet, path: str | os.PathLike) -> Path:
    """Write every weight of ``net`` plus its WrapConfig, atomically."""
    if net.config is None or net.spec.library == "module":
        raise UserError("only a training graph wrapped from a model name can be saved and rebuilt")
    metadata = {"format": FORMAT, "wrap": config_to_json(net.config)}
    return save_safetensors_atomic(net.state_dict(), path, metadata)


def load_graph(path: str | os.PathLike) -> TreeNet:
    """Rebuild the training graph saved in ``path`` and load its weights strictly."""
    metadata = read_metadata(path, FORMAT, "a file from 'collabsurgery wrap --save' or a run dir")
    net = rebuild(config_from_json(metadata["wrap"]))
    net.load_state_dict(load_state(path), strict=True)
    return net
