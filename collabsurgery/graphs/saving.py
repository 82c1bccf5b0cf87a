"""A whole training graph in one safetensors file, with the config that rebuilds it.

``collabsurgery wrap ... --save graph.safetensors`` writes one; ``collabsurgery export`` reads it
(or a training run directory) and writes a single head as a plain backbone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from collabsurgery.common.tensorfile import load_state, read_metadata, save_safetensors_atomic
from collabsurgery.errors import UserError
from collabsurgery.graphs import GraphConfig, TrainingGraph, rebuild

FORMAT = "collabsurgery.graph/1"  # the config is under "wrap" (first-wave files read too)


def config_from_json(text: str) -> GraphConfig:
    """A :class:`GraphConfig` from ``graph.json`` text; the first wave's tree-only format
    (``{model, split, heads, pattern, ...}``) is read too."""
    raw = json.loads(text)
    if isinstance(raw, dict) and "kind" not in raw and "pattern" in raw:
        pattern = raw.pop("pattern")
        if pattern == "instances":
            raw.pop("split", None)
            raw.pop("branches", None)
        return GraphConfig(pattern, raw)
    return GraphConfig.from_json(text)


def save_graph(net: TrainingGraph, path: str | os.PathLike) -> Path:
    """Write every weight of ``net`` plus its config, atomically."""
    if any(net.head_spec(h).library == "module" for h in range(net.num_heads)):
        raise UserError("only a training graph wrapped from a model name can be saved and rebuilt")
    metadata = {"format": FORMAT, "wrap": net.config.to_json()}
    return save_safetensors_atomic(net.state_dict(), path, metadata)


def load_graph(path: str | os.PathLike) -> TrainingGraph:
    """Rebuild the training graph saved in ``path`` and load its weights strictly."""
    metadata = read_metadata(path, FORMAT, "a file from 'collabsurgery wrap --save' or a run dir")
    net = rebuild(config_from_json(metadata["wrap"]))
    net.load_state_dict(load_state(path), strict=True)
    return net
