"""Backbones by name: timm names, ``torchvision.<name>``, or a ready ``nn.Module``.

A :class:`BackboneSpec` is everything needed to rebuild the unmodified model later (export
metadata, ``load_backbone``): which library, which factory name, which keyword arguments.
Nothing is ever downloaded: timm models are created with ``pretrained=False`` and torchvision
models with ``weights=None``.
"""
from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass, field
from typing import Any

import timm
import torch.nn as nn
import torchvision

from collabsurgery.errors import UserError

TORCHVISION_PREFIX = "torchvision."


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild a backbone: ``library`` is "timm", "torchvision" or "module"."""

    library: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def qualified_name(self) -> str:
        """The name a user types: ``resnet50`` or ``torchvision.resnet50``."""
        return TORCHVISION_PREFIX + self.name if self.library == "torchvision" else self.name

    def kwargs_json(self) -> str:
        """Factory keyword arguments as canonical JSON (for safetensors metadata)."""
        return json.dumps(self.kwargs, sort_keys=True)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def parse_model_name(name: str, kwargs: dict[str, Any] | None = None) -> BackboneSpec:
    """Resolve a user-typed model name into a :class:`BackboneSpec`, or raise UserError."""
    kwargs = dict(kwargs or {})
    if name.startswith(TORCHVISION_PREFIX):
        short = name[len(TORCHVISION_PREFIX):]
        valid = _torchvision_names()
        if short not in valid:
            raise UserError(f"unknown torchvision model '{short}'{_suggest(short, valid)}; "
                            "valid: any name from torchvision.models.list_models()")
        return BackboneSpec("torchvision", short, kwargs)
    if not timm.is_model(name):
        hint = _suggest(name, timm.list_models()) or _suggest(name, _torchvision_names())
        raise UserError(f"unknown model '{name}'{hint}; valid: a timm model name "
                        "(timm.list_models()) or 'torchvision.<name>'")
    return BackboneSpec("timm", name, kwargs)


def create(spec: BackboneSpec) -> nn.Module:
    """Build the unmodified backbone described by ``spec``, with random weights."""
    try:
        if spec.library == "timm":
            return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
        if spec.library == "torchvision":
            return torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
    except TypeError as err:  # an unknown factory keyword
        raise UserError(f"model '{spec.qualified_name}' rejected its arguments "
                        f"{spec.kwargs}: {err}") from None
    raise UserError(f"cannot rebuild a model from library '{spec.library}'; "
                    "valid: timm, torchvision")


def resolve(model: str | nn.Module, **kwargs: Any) -> tuple[nn.Module, BackboneSpec]:
    """Return ``(module, spec)`` for a model name or a ready module.

    A ready module keeps its identity; its spec has library "module", so loading an export
    of it needs the caller to pass a module to load into.
    """
    if not isinstance(model, (str, nn.Module)):
        raise UserError(f"model must be a timm name, torchvision.<name> or an nn.Module, got "
                        f"{model!r}; several models form a peer group: use pattern 'peers'")
    if isinstance(model, nn.Module):
        if kwargs:
            raise UserError("factory keyword arguments only apply to a model given by name")
        return model, BackboneSpec("module", type(model).__name__)
    classes = kwargs.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                or classes < 1):
        raise UserError(f"num_classes must be an integer >= 1 (every head classifies), "
                        f"got {classes!r}")
    spec = parse_model_name(model, kwargs)
    return create(spec), spec


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) a model expects: timm's pretrained_cfg, else the ``image_size`` a
    torchvision ViT was built for, else ImageNet's 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size:
        return tuple(size)
    side = getattr(model, "image_size", None)
    return (3, side, side) if isinstance(side, int) and side > 0 else (3, 224, 224)


def fresh_instance(module: nn.Module, spec: BackboneSpec) -> nn.Module:
    """A newly initialised model like ``module``.

    A named model is created again by its factory; a ready module is deep-copied and every
    submodule with ``reset_parameters`` is reset. Copies that see the same input must not start
    from the same weights, or they would stay identical.
    """
    if spec.library in ("timm", "torchvision"):
        return create(spec)
    fresh = copy.deepcopy(module)
    for sub in fresh.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return fresh
