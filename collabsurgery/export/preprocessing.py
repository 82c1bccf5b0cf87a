"""What input an exported head expects: size, normalisation, resize and crop.

Each setting comes from the first of these that has it, and the artifact records which
(``preprocessing_source``):

``recipe``
    the run's recipe (``data.test_image_size`` or ``data.image_size``: the evaluation size;
    ``data.interpolation``, ``data.crop_pct``, ``data.mean``/``data.std`` when set or resolved
    by the run). A run with ``data.preset: small`` (the default) resizes the shorter side
    (bilinear) and centre-crops, so ``bilinear`` and crop_pct ``1.0`` come from the recipe too;
    its mean/std are the training split's statistics, which a run does not record unless
    ``data.mean``/``data.std`` are given (then ``model`` is named, with that caveat).
``graph``
    the training graph's input size (a graph file, or ``cs.export`` without a recipe).
``model``
    the model's data configuration: timm's ``resolve_data_config`` (its ``pretrained_cfg``,
    with the input size the model was built for, ``get_model_input_config``); for
    torchvision models, torchvision's ImageNet classification transforms (bilinear, resize to
    size / 0.875, centre crop, ImageNet mean/std).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
import yaml
from timm.data import resolve_data_config
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_model_input_config

from collabsurgery.models.backbones import default_input_size

#: the small preset's evaluation transform (collabsurgery.data.datasets)
_SMALL = {"interpolation": "bilinear", "crop_pct": 1.0}
_UNRECORDED = "model (the run normalised with its training split's statistics, not recorded)"


@dataclass
class Preprocessing:
    """The input an artifact expects, and where each setting came from."""

    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"
    source: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """String pairs for an artifact's metadata (lists as JSON)."""
        return {"input_size": json.dumps(list(self.input_size)), "batch": "dynamic",
                "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
                "interpolation": self.interpolation, "crop_pct": f"{self.crop_pct:g}",
                "crop_mode": self.crop_mode,
                "preprocessing_source": json.dumps(self.source, sort_keys=True)}


def parse_recipe(text: str) -> dict[str, Any]:
    """A recipe's YAML text as a mapping ({} when empty or unreadable)."""
    try:
        recipe = yaml.safe_load(text) if text and text.strip() else {}
    except yaml.YAMLError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def model_data_config(model: nn.Module, library: str) -> dict[str, Any]:
    """The model's own data configuration (see the module docstring)."""
    if library == "torchvision":
        return {"input_size": tuple(default_input_size(model)), "interpolation": "bilinear",
                "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 0.875,
                "crop_mode": "center"}
    config = resolve_data_config(model=model)
    try:  # the size the model was built for (img_size=...), where pretrained_cfg keeps timm's
        config["input_size"] = tuple(get_model_input_config(model)["input_size"])
    except Exception:  # noqa: BLE001, S110 - a model timm cannot describe: its pretrained_cfg
        pass
    return config


def _pick(source: dict[str, str], key: str, *candidates: tuple[str, Any]) -> Any:
    for where, value in candidates:
        if value is not None:
            source[key] = where
            return value
    raise AssertionError(f"no value for {key}")  # the model's config always has one


def resolve(model: nn.Module, library: str, recipe: dict[str, Any] | None = None,
            graph_input_size: Sequence[int] | None = None) -> Preprocessing:
    """The preprocessing of ``model`` trained with ``recipe`` (a run's, or None/{}), whose
    training graph took ``graph_input_size``."""
    own = model_data_config(model, library)
    data = (recipe or {}).get("data") or {}
    data = data if isinstance(data, dict) else {}
    source: dict[str, str] = {}
    side = next((data[k] for k in ("test_image_size", "image_size")
                 if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)), None)
    channels = graph_input_size[0] if graph_input_size else own["input_size"][0]
    size = _pick(source, "input_size", ("recipe", None if side is None else (channels, side, side)),
                 ("graph", tuple(graph_input_size) if graph_input_size else None),
                 ("model", tuple(own["input_size"])))
    small = bool(data) and data.get("preset", "small") == "small"
    interpolation = data.get("interpolation")
    interpolation = interpolation if isinstance(interpolation, str) and interpolation != "random" \
        else None
    mean_std = (data.get("mean"), data.get("std"))
    recorded = all(isinstance(v, list) and len(v) == size[0] for v in mean_std)
    pre = Preprocessing(
        input_size=tuple(int(s) for s in size),
        interpolation=_pick(source, "interpolation", ("recipe", interpolation),
                            ("recipe", _SMALL["interpolation"] if small else None),
                            ("model", own["interpolation"])),
        crop_pct=float(_pick(source, "crop_pct", ("recipe", data.get("crop_pct")),
                             ("recipe", _SMALL["crop_pct"] if small else None),
                             ("model", own["crop_pct"]))),
        mean=tuple(mean_std[0] if recorded else own["mean"]),
        std=tuple(mean_std[1] if recorded else own["std"]),
        crop_mode=own.get("crop_mode", "center"), source=source)
    source["mean_std"] = "recipe" if recorded else _UNRECORDED if small else "model"
    return pre
