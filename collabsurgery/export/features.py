"""An export as a feature extractor: the backbone without its classifier, for dense tasks.

``load_features(path, out_indices)`` returns a module whose ``forward(x)`` is a list of feature
maps ``[B, C_i, H/r_i, W/r_i]`` and whose ``feature_info`` (timm's :class:`FeatureInfo`) gives
``channels()``, ``reduction()`` and ``module_name()`` of the levels chosen by ``out_indices``.

- timm models go through timm's own ``features_only`` machinery (its feature classes and levels,
  the classifier dropped by the model's ``pretrained_cfg["classifier"]``), loading the export as
  a local pretrained file.
- torchvision models have no ``feature_info``: their levels are the clean split points between
  the stem and the model's head module (``fc``, ``classifier``, ``heads`` or ``head``, and the
  global pool before it), the last one at each reduction, read from a probe at the model's
  input size; the extractor is torchvision's ``create_feature_extractor`` at those points.

Either way every tensor of the extractor is checked to be exactly the export's tensor.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import FeatureInfo
from torchvision.models.feature_extraction import create_feature_extractor

from collabsurgery.common.tensorfile import load_state
from collabsurgery.errors import UserError, first_line
from collabsurgery.export.backbone import export_metadata, factory_kwargs, load_plain
from collabsurgery.models.backbones import default_input_size
from collabsurgery.surgery.cuts import split_points
from collabsurgery.surgery.trace import trace

# torchvision's classification models end in one of these modules (resnet/regnet/shufflenet:
# fc; densenet/mobilenet/efficientnet/vgg/convnext/...: classifier; vit: heads; swin: head)
TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")
_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class FeatureExtractor(nn.Module):
    """A torchvision feature extractor returning a list of maps, with timm's ``feature_info``."""

    def __init__(self, body: nn.Module, levels: list[dict[str, Any]], out_indices: Sequence[int]):
        super().__init__()
        self.body = body
        self.feature_info = FeatureInfo(levels, tuple(out_indices))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the chosen levels, shallowest first."""
        return list(self.body(x).values())


@contextmanager
def _quiet_timm() -> Iterator[None]:
    # timm logs the classifier keys it leaves out as "unexpected keys"; the check after the load
    # is what guarantees exactness, so these lines would only alarm
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _timm_features(path: Path, name: str, kwargs: dict[str, Any],
                   out_indices: Sequence[int] | None) -> nn.Module:
    if out_indices is not None:
        kwargs = {**kwargs, "out_indices": tuple(out_indices)}
    try:
        with _quiet_timm():
            return timm.create_model(name, pretrained=True, features_only=True,
                                     pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as err:  # timm raises RuntimeError, AssertionError, IndexError, ...
        raise UserError(f"timm cannot build {name} with features_only=True"
                        f"{f', out_indices={tuple(out_indices)}' if out_indices else ''} "
                        f"({first_line(err)}); valid: a model timm gives a feature extractor "
                        f"(timm.create_model(..., features_only=True)) and out_indices within "
                        "its feature_info, or cs.load_backbone(path) with your own hooks") from None


def _children_before_head(model: nn.Module, name: str) -> list[str]:
    """Top-level children that may hold feature levels: those before the head and its pool."""
    children = list(model.named_children())
    names = [n for n, _ in children]
    head = next((n for n in TORCHVISION_HEADS if n in names), None)
    if head is None:
        raise UserError(f"torchvision.{name} has none of the head modules "
                        f"{', '.join(TORCHVISION_HEADS)}; valid: a torchvision classification "
                        "model")
    end = names.index(head)
    pools = [i for i, (_, m) in enumerate(children) if isinstance(m, _GLOBAL_POOLS)]
    return names[:min([end, *pools])]


def feature_levels(model: nn.Module, name: str) -> list[dict[str, Any]]:
    """Feature levels of a torchvision classifier, as timm's ``feature_info`` entries.

    Candidates are the clean split points whose output is a ``[B, C, H, W]`` map, in the last
    run of such points before the head (a ViT's patch embedding is followed by token sequences,
    so a ViT has none). At each reduction the level is the last candidate among the shallowest
    module names: a block's output (``features.3``), not a cut inside the next block before
    its stride (``features.4.conv.0``).
    """
    size = default_input_size(model)
    traced = trace(model, size)
    allowed = set(_children_before_head(model, name))
    by_reduction: dict[int, list[tuple[int, str, int]]] = {}
    for point in split_points(traced):
        if point.split(".")[0] not in allowed:
            continue
        shape = traced.train.shape[traced.train.resolve(point)]
        if not (len(shape) == 4 and size[1] * shape[3] == size[2] * shape[2]):
            by_reduction = {}  # maps that later become tokens are not this model's features
            continue
        reduction = round(size[1] / shape[2])
        by_reduction.setdefault(reduction, []).append((point.count("."), point, shape[1]))
    levels = []
    for reduction, found in by_reduction.items():
        depth = min(d for d, _, _ in found)
        _, point, channels = [f for f in found if f[0] == depth][-1]
        levels.append({"module": point, "num_chs": channels, "reduction": reduction})
    return levels


def _torchvision_features(path: Path, name: str, model_kwargs: dict[str, Any],
                          out_indices: Sequence[int] | None) -> nn.Module:
    model = load_plain(path, **model_kwargs)
    levels = feature_levels(model, name)
    if not levels:
        raise UserError(f"torchvision.{name} has no spatial feature maps before its head; "
                        "valid: a convolutional torchvision model (resnet, mobilenet, densenet, "
                        "efficientnet, ...), or a timm model with features_only")
    indices = tuple(range(len(levels))) if out_indices is None else tuple(out_indices)
    if not indices or any(not -len(levels) <= i < len(levels) for i in indices):
        raise UserError(f"out_indices {indices} out of range for torchvision.{name}; valid: "
                        f"0..{len(levels) - 1} (levels {', '.join(lv['module'] for lv in levels)})")
    indices = tuple(i % len(levels) for i in indices)
    nodes = {levels[i]["module"]: str(k) for k, i in enumerate(indices)}
    body = create_feature_extractor(model, return_nodes=nodes)
    return FeatureExtractor(body, levels, indices).eval()


def _plain_name(key: str) -> str:
    # timm's feature wrappers rename modules: blocks.1 -> blocks_1 (flattened sequentials) and
    # model.<key> (FeatureGetterNet); dots and underscores are not told apart when matching
    return key.replace("_", ".")


def check_exact(extractor: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """UserError unless every tensor of ``extractor`` is the export's tensor of that name."""
    exported = {}
    for key in state:
        exported.setdefault(_plain_name(key), []).append(key)
    wrong = []
    for key, tensor in extractor.state_dict().items():
        for candidate in (key, key.removeprefix("model."), key.removeprefix("body.")):
            found = exported.get(_plain_name(candidate), [])
            if len(found) == 1:
                break
        if len(found) != 1 or not torch.equal(state[found[0]], tensor):
            wrong.append(key)
    if wrong:
        raise UserError(f"the feature extractor built from {path} does not hold its weights "
                        f"exactly ({len(wrong)} tensors differ, e.g. {wrong[0]}); valid: "
                        "cs.load_backbone(path) without features_only")


def load_features(path: str | os.PathLike, out_indices: Sequence[int] | None = None,
                  **model_kwargs: Any) -> nn.Module:
    """The backbone of export ``path`` without its classifier, returning feature maps.

    Args:
        path: a file written by ``cs.export`` / ``collabsurgery export``.
        out_indices: which feature levels to return (default: all); for timm models indices
            into the model's ``feature_info``, for torchvision models into the levels found by
            :func:`feature_levels` (ResNet: the stem's activation, layer1..layer4).
        model_kwargs: override the recorded factory arguments.
    Returns:
        an ``nn.Module`` in eval mode: ``forward(x) -> list[Tensor]``, ``feature_info``.
    """
    path = Path(path)
    metadata = export_metadata(path)
    state = load_state(path)  # checks the checksum before anything is built from it
    library, name = metadata.get("library"), metadata.get("architecture", "")
    if library == "timm":
        kwargs = {**factory_kwargs(path, metadata), **model_kwargs}
        extractor = _timm_features(path, name, kwargs, out_indices).eval()
    elif library == "torchvision":
        extractor = _torchvision_features(path, name, model_kwargs, out_indices)
    else:
        raise UserError(f"{path} holds a {library!r} backbone ({name}); feature extraction "
                        "needs a timm or torchvision architecture to rebuild; valid: load it "
                        "into your module with cs.load_backbone(path, model=...) and use "
                        "torchvision.models.feature_extraction on it")
    check_exact(extractor, state, path)
    return extractor
