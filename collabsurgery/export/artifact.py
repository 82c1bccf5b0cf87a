"""A head, or a backbone export file, as a verified deployment artifact (ONNX, torch.export).

The artifact is made from the plain backbone rebuilt from the export and loaded strictly
(:func:`collabsurgery.export.backbone.load_plain`), or its feature extractor
(:func:`collabsurgery.export.features.load_features`): exactly the head's weights, in eval
mode. Its metadata is the export's (architecture, factory arguments, head, version, and for a
run its recipe, metrics and name) with the preprocessing of
:mod:`collabsurgery.export.preprocessing`; export and verification are
:mod:`collabsurgery.export.deploy`'s.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from collabsurgery.common.integrity import CHECKSUM_KEY
from collabsurgery.errors import UserError
from collabsurgery.export import deploy, preprocessing
from collabsurgery.export.backbone import export as export_safetensors
from collabsurgery.export.backbone import export_metadata, load_plain
from collabsurgery.export.features import load_features
from collabsurgery.graphs import TrainingGraph

#: formats of an export, the first being a backbone file (collabsurgery.export.backbone)
FORMATS = ("safetensors", *deploy.FORMATS)


def check_format(format: str, opset: int | None = None, features_only: bool = False) -> None:
    """UserError unless ``format`` is one of :data:`FORMATS` and the options apply to it."""
    if format not in FORMATS:
        raise UserError(f"unknown format '{format}'; valid: {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise UserError(f"opset applies to format onnx only, not {format}")
    if features_only and format == "safetensors":
        raise UserError("features_only applies to formats onnx and torch-export; a "
                        "safetensors export loads as features with "
                        "cs.load_backbone(path, features_only=True)")


def export_artifact(export_file: str | os.PathLike, output: str | os.PathLike, format: str, *,
                    input_size: Sequence[int] | None = None, opset: int | None = None,
                    features_only: bool = False, out_indices: Sequence[int] | None = None,
                    model: nn.Module | None = None) -> deploy.Verified:
    """Export file ``export_file`` as a verified ``format`` artifact at ``output``.

    ``input_size``: the training graph's (used when the export has no recipe with an image
    size; otherwise the model's default); ``opset``: ONNX only; ``features_only``: the feature
    maps (``features.<i>``, levels ``out_indices``) instead of the logits; ``model``: a module
    to load a ready-module export into. Returns the :class:`~collabsurgery.export.deploy.Verified`.
    """
    export_file = Path(export_file)
    check_format(format, opset, features_only)
    output = deploy.check_target(format, output)
    metadata = export_metadata(export_file)
    if model is not None and features_only:
        raise UserError("features_only rebuilds the model from the export's metadata; pass "
                        "either model= or features_only=True, not both")
    plain = load_plain(export_file, model)
    net = load_features(export_file, out_indices) if features_only else plain
    recipe = preprocessing.parse_recipe(metadata.get("recipe", ""))
    pre = preprocessing.resolve(plain, metadata.get("library", "module"), recipe, input_size)
    props: dict[str, Any] = {k: v for k, v in metadata.items()
                             if k not in ("format", CHECKSUM_KEY)}
    props.update(pre.metadata(), features_only=str(features_only).lower())
    if features_only:
        info = net.feature_info
        props.update(feature_channels=json.dumps(info.channels()),
                     feature_reductions=json.dumps(info.reduction()))
    name = metadata.get("architecture", "the model")
    what = f"{name} (features)" if features_only else name
    return deploy.save_artifact(net, output, format, pre.input_size, opset=opset,
                                metadata=props, what=what)


def export_head(net: nn.Module, head: int, path: str | os.PathLike, format: str, *,
                extra_metadata: dict[str, Any] | None = None, opset: int | None = None,
                features_only: bool = False) -> deploy.Verified:
    """Head ``head`` of training graph ``net`` as a verified ``format`` artifact at ``path``
    (``onnx`` or ``torch-export``): written as a backbone file to a temporary folder first (the
    same checks as :func:`~collabsurgery.export.backbone.export`), then exported from it."""
    check_format(format, opset, features_only)
    if format == "safetensors":
        raise UserError("export_head makes onnx or torch-export artifacts; a safetensors "
                        "export is cs.export(net, head, path)")
    deploy.check_target(format, path)  # before any work
    valid = isinstance(net, TrainingGraph) and isinstance(head, int) \
        and not isinstance(head, bool) and 0 <= head < net.num_heads
    spec = net.head_spec(head) if valid else None  # otherwise export_safetensors says why
    if spec is not None and spec.library == "module":
        raise UserError(f"head {head} is a ready module ({spec.name}), which cannot be rebuilt "
                        "by name; write cs.export(net, head, 'head.safetensors'), then "
                        "collabsurgery.export.artifact.export_artifact('head.safetensors', "
                        f"path, '{format}', model=<a new {spec.name}>)")
    with tempfile.TemporaryDirectory(prefix="collabsurgery-deploy-") as tmp:
        backbone = export_safetensors(net, head, Path(tmp) / "head.safetensors",
                                      extra_metadata)
        return export_artifact(backbone, path, format, input_size=net.input_size, opset=opset,
                               features_only=features_only)
