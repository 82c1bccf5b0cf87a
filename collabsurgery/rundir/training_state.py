"""Nested state dicts (optimizer, LR scheduler, grad scaler) in one safetensors file, no pickle.

``torch.save`` pickles, and unpickling a file can run code; with this module no file a run
writes needs unpickling. The state's tensors are the file's tensors, named by their path in the
tree (``state/0/momentum_buffer``); everything else is JSON in the safetensors metadata:

=============  ================================================================
``format``     ``collabsurgery.state/1``
``structure``  the tree as JSON, each tensor replaced by ``{"tensor": name}``
=============  ================================================================

Loading is exact: int and str dict keys (in order), tuples and lists, None, bool, int, float
(inf and nan included) and str, and every tensor's dtype, shape and bits come back as saved.
Tensors come back on the CPU; ``Optimizer.load_state_dict`` moves them to the parameters' device.

JSON forms: None, bool, int, str and finite floats are themselves, a list is an array, and
``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``, ``{"float": "nan"}`` and
``{"tensor": name}`` stand for the rest.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from collabsurgery.common.tensorfile import load_state as load_tensors
from collabsurgery.common.tensorfile import read_metadata, save_safetensors_atomic
from collabsurgery.errors import UserError

FORMAT = "collabsurgery.state/1"
VALID = "a state file written by collabsurgery.rundir.training_state.save_state"


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (e.g. ``optimizer.state_dict()``) to ``path`` atomically; returns the path.

    Values may be nested dicts (int or str keys), lists, tuples, None, bool, int, float, str and
    strided tensors; anything else raises TypeError naming its path in the tree, before any
    file is written.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, not {type(state).__qualname__}")
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, [], tensors)
    metadata = {"format": FORMAT,
                "structure": json.dumps(structure, allow_nan=False, separators=(",", ":"))}
    return save_safetensors_atomic(tensors, path, metadata)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved at ``path`` by :func:`save_state`, exactly as it was saved.

    A missing, truncated or foreign file raises UserError with one line naming it.
    """
    path = Path(path)
    metadata = read_metadata(path, FORMAT, VALID)
    tensors = load_tensors(path)
    try:
        state = _decode(json.loads(metadata["structure"]), tensors)
        if not isinstance(state, dict):
            raise TypeError("the top level is not a dict")
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} has corrupt 'structure' metadata ({type(err).__name__}: "
                        f"{err}); valid: {VALID}") from None
    return state


def _encode(value: Any, path: list[str], tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data; its tensors go into ``tensors`` under their path."""
    kind = type(value)  # exact types: a subclass (IntEnum, numpy float64, ...) would not round trip
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if kind in (list, tuple):
        items = [_encode(item, path + [str(i)], tensors) for i, item in enumerate(value)]
        return items if kind is list else {"tuple": items}
    if isinstance(value, Mapping):
        pairs = []
        for key, item in value.items():
            if type(key) not in (int, str):
                raise TypeError(f"cannot store the {type(key).__qualname__} key {key!r} at "
                                f"'{'/'.join(path)}' of the state; valid: int or str keys")
            pairs.append([key, _encode(item, path + [str(key)], tensors)])
        return {"dict": pairs}
    if isinstance(value, torch.Tensor) and value.layout == torch.strided:
        name = base = "/".join(path)
        suffix = 1
        while name in tensors:  # keys 0 and "0" in one dict, or "a/b" beside "a": {"b": ...}
            name, suffix = f"{base}#{suffix}", suffix + 1
        tensors[name] = value
        return {"tensor": name}
    raise TypeError(f"cannot store a {kind.__qualname__} at '{'/'.join(path)}' of the state; "
                    "valid: dict, list, tuple, None, bool, int, float, str, strided tensor")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value that :func:`_encode` turned into ``node``."""
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node
    (tag, body), = node.items()
    if tag == "dict":
        return {key: _decode(item, tensors) for key, item in body}
    if tag == "tuple":
        return tuple(_decode(item, tensors) for item in body)
    if tag == "float":
        return float(body)
    if tag == "tensor":
        return tensors[body]
    raise ValueError(f"unknown tag {tag!r}")
