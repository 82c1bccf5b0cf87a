"""Export: one head of a training graph to a plain backbone, and back.

- :mod:`.backbone`: write a head as a safetensors file whose keys are exactly the plain model's
  ``state_dict()``; rebuild and load it strictly.
- :mod:`.features`: an export as a feature extractor (``features_only=True``).
- :mod:`.model_folder`: an export as a timm model folder (``config.json`` + weights + card).
- :mod:`.deploy`, :mod:`.artifact`, :mod:`.preprocessing`: a head as a verified deployment
  artifact (ONNX, torch.export) with its preprocessing in the metadata.
- :mod:`.from_run`: find what to export in a run directory or a graph file (which head, which
  checkpoint).

May import: errors, common, models, surgery, graphs, objectives, config, rundir; never train/
(see docs/architecture.md).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from collabsurgery.errors import UserError
from collabsurgery.export.artifact import FORMATS, check_format, export_head
from collabsurgery.export.backbone import FORMAT, export_metadata, factory_kwargs, load_plain
from collabsurgery.export.backbone import export as export_safetensors
from collabsurgery.export.features import load_features

__all__ = ["FORMAT", "FORMATS", "export", "export_metadata", "factory_kwargs", "load_backbone"]


def export(net: nn.Module, head: int = 0, path: str | os.PathLike = "backbone.safetensors",
           extra_metadata: dict[str, Any] | None = None, *, format: str = "safetensors",
           opset: int | None = None, features_only: bool = False) -> Path:
    """Write head ``head`` of training graph ``net`` as a plain backbone; returns the path.

    ``format``:

    - ``"safetensors"`` (default): the head's weights, exactly the plain model's
      ``state_dict()`` keys, with metadata to rebuild it (:mod:`.backbone`; load with
      :func:`load_backbone`). Peers export each as its own architecture.
    - ``"onnx"``: an ONNX file (``opset``: the ai.onnx opset, None the exporter's default) with
      a dynamic batch, input ``input``, output ``logits``; needs ``pip install
      collabsurgery[onnx]``.
    - ``"torch-export"``: a ``torch.export`` program (``torch.export.save``; load with
      ``torch.export.load(path).module()``) with a dynamic batch.

    Both artifacts are verified before they are kept: their outputs (onnxruntime's,
    ``torch.export.load``'s) on seeded batches equal the head's eval-mode logits to within
    1e-4 x max|logit| + 1e-5, else nothing is written (:mod:`.deploy`). ``features_only``
    exports the feature maps (``features.<i>``) instead of the logits. The metadata holds the
    export's and the preprocessing (:mod:`.preprocessing`).
    """
    check_format(format, opset, features_only)
    if format == "safetensors":
        return export_safetensors(net, head, path, extra_metadata)
    return export_head(net, head, path, format, extra_metadata=extra_metadata, opset=opset,
                       features_only=features_only).path


def load_backbone(path: str | os.PathLike, model: nn.Module | None = None, *,
                  features_only: bool = False, out_indices: Sequence[int] | None = None,
                  **model_kwargs: Any) -> nn.Module:
    """Rebuild the unmodified backbone from an export's metadata and load it strictly.

    ``model`` loads into a given module instead (required for exports of a ready module);
    ``model_kwargs`` override the recorded factory arguments. ``features_only=True`` returns
    the backbone without its classifier as a feature extractor (``forward(x)`` -> list of maps,
    ``feature_info``; ``out_indices`` picks the levels): see :mod:`collabsurgery.export.features`.
    """
    if features_only:
        if model is not None:
            raise UserError("features_only rebuilds the model from the export's metadata; "
                            "pass either model= or features_only=True, not both")
        return load_features(path, out_indices, **model_kwargs)
    if out_indices is not None:
        raise UserError("out_indices needs features_only=True")
    return load_plain(path, model, **model_kwargs)
