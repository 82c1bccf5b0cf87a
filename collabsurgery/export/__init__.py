"""Export: one head of a training graph to a plain backbone, and back.

- :mod:`.backbone`: write a head as a safetensors file whose keys are exactly the plain model's
  ``state_dict()``; rebuild and load it strictly.
- :mod:`.features`: an export as a feature extractor (``features_only=True``).
- :mod:`.model_folder`: an export as a timm model folder (``config.json`` + weights + card).
- :mod:`.from_run`: find what to export in a run directory or a graph file (which head, which
  checkpoint).

May import: errors, common, models, surgery, graphs, objectives, config, rundir; never train/
(see docs/architecture.md).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from collabsurgery.errors import UserError
from collabsurgery.export.backbone import (FORMAT, export, export_metadata, factory_kwargs,
                                           load_plain)
from collabsurgery.export.features import load_features

__all__ = ["FORMAT", "export", "export_metadata", "factory_kwargs", "load_backbone"]


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
