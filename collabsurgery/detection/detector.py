"""A torchvision Faster R-CNN with FPN on an exported backbone, starting from its exact weights.

Two routes, chosen from the export's metadata:

- torchvision ResNets (``resnet*``, ``resnext*``, ``wide_resnet*``): torchvision's own
  ``resnet_fpn_backbone`` (FrozenBatchNorm2d, ``trainable_layers`` as in its recipe), then the
  export's tensors loaded strictly into ``backbone.body``. The keys the body does not hold must be
  those of the modules ``IntermediateLayerGetter`` cut off (the ``fc`` classifier, and stages
  after the last returned level); anything else is refused.
- everything else: ``load_backbone(path, features_only=True)`` (timm's feature extractors, or
  the equivalent for torchvision models), BatchNorm frozen with ``timm.layers.
  freeze_batch_norm_2d``, torchvision's ``FeaturePyramidNetwork`` + ``LastLevelMaxPool`` on top.

Feature levels are numbered as timm numbers them (ResNet: 0 = stem at stride 2, 1..4 =
layer1..layer4). By default the detector uses the last four levels with stride >= 4 (ResNets:
layer1..layer4, torchvision's default), plus the max-pooled level. Anchor sizes are
``anchor_size * stride / 4`` per level (torchvision's 32..512 for ``anchor_size=32``), aspect
ratios 0.5, 1, 2 at every level.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from collabsurgery.common.tensorfile import load_state
from collabsurgery.errors import UserError
from collabsurgery.export import export_metadata, factory_kwargs, load_backbone

FPN_CHANNELS = 256
DEFAULT_LEVELS = 4
RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
# factory arguments that do not change a ResNet body (resnet_fpn_backbone takes none)
_BODY_NEUTRAL_KWARGS = ("num_classes", "zero_init_residual")
VALID_EXPORT = "an export written by collabsurgery export / cs.export (a .safetensors backbone)"


@dataclass
class DetectorInfo:
    """How a detector was built from its export (recorded with the fine-tuned weights)."""

    architecture: str
    library: str
    route: str  # "resnet_fpn_backbone" or "features"
    out_indices: list[int]
    strides: list[int]
    anchor_sizes: list[int]
    trainable_layers: int

    def to_metadata(self) -> dict[str, str]:
        """String metadata for safetensors."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}


def read_backbone(path: str | Path) -> dict[str, str]:
    """The export's metadata; UserError for a file that is not an export."""
    return export_metadata(path, valid=VALID_EXPORT)


def uses_resnet_fpn(metadata: dict[str, str]) -> bool:
    """Whether the export goes through torchvision's ``resnet_fpn_backbone``: a torchvision
    ResNet whose recorded factory arguments do not change the body (others take the features
    route, which passes them on)."""
    name = metadata.get("architecture", "")
    return (metadata.get("library") == "torchvision" and name.startswith(RESNET_PREFIXES)
            and name in torchvision.models.resnet.__all__
            and set(factory_kwargs(Path(name), metadata)) <= set(_BODY_NEUTRAL_KWARGS))


def _check_dropped(path: Path, name: str, body: nn.Module, dropped: list[str],
                   returned: list[int]) -> None:
    """Refuse unless every export key the body lacks belongs to a module the body was meant to
    cut off: the classifier, or a stage after the last returned level."""
    with torch.device("meta"):
        reference = torchvision.models.get_model(name, weights=None)
    kept = {n for n, _ in body.named_children()}
    cut = {n for n, _ in reference.named_children() if n not in kept}
    heads = {n for n, m in reference.named_children() if m is reference.fc}
    later = {f"layer{k}" for k in range(max(returned) + 1, 5)}
    if not cut <= heads | later | {"avgpool"}:
        raise UserError(f"{path}: the detector body of {name} would lose "
                        f"{', '.join(sorted(cut - heads - later))}, which is not its classifier")
    for key in dropped:
        if key.split(".", 1)[0] not in cut:
            raise UserError(f"{path}: tensor {key} is neither in the {name} detector body nor in "
                            f"its classifier ({', '.join(sorted(heads))}); valid: {VALID_EXPORT}")


def _resnet_backbone(path: Path, metadata: dict[str, str], trainable_layers: int,
                     out_indices: list[int] | None) -> tuple[nn.Module, list[int]]:
    name = metadata["architecture"]
    returned = list(out_indices or [1, 2, 3, 4])
    if not all(1 <= k <= 4 for k in returned) or returned != sorted(set(returned)):
        raise UserError(f"--out-indices {','.join(map(str, returned))} for {name}: valid: "
                        "increasing levels from 1..4 (layer1..layer4)")
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=trainable_layers, returned_layers=returned)
    state = load_state(path)
    body = backbone.body
    wanted = set(body.state_dict())
    frozen_bn = {n for n, m in body.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    # FrozenBatchNorm2d has no num_batches_tracked; it drops that key itself when loading
    counter = {k for k in state if k.endswith(".num_batches_tracked")
               and k.rsplit(".", 1)[0] in frozen_bn}
    dropped = [k for k in state if k not in wanted and k not in counter]
    _check_dropped(path, name, body, dropped, returned)
    body_state = {k: v for k, v in state.items() if k in wanted or k in counter}
    try:
        body.load_state_dict(body_state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the {name} detector body: "
                        f"{' '.join(str(err).strip().splitlines()[:2])}") from None
    return backbone, [2 ** (k + 1) for k in returned]


class FeaturesWithFPN(nn.Module):
    """A feature extractor (``forward`` -> list of maps, ``feature_info``) under an FPN; like
    torchvision's ``BackboneWithFPN``: ``body``, ``fpn``, ``out_channels``."""

    def __init__(self, body: nn.Module, positions: list[int], channels: list[int],
                 out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.body = body
        self.positions = positions
        self.channels = channels
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """FPN maps ``"0"``, ``"1"``, ... and ``"pool"``."""
        maps = self.body(x)
        selected = OrderedDict()
        for i, (p, c) in enumerate(zip(self.positions, self.channels)):
            m = maps[p]
            if m.shape[1] != c and m.shape[-1] == c:  # timm models with NHWC feature maps
                m = m.permute(0, 3, 1, 2)
            selected[str(i)] = m
        return self.fpn(selected)


def _module_index(modules: list[str], name: str) -> int | None:
    """Position of feature module ``name`` (timm's dotted name) among ``modules``; feature
    wrappers flatten ``stages.1`` to ``stages_1`` or nest the model under a prefix."""
    candidates = (name, name.replace(".", "_"))
    for match in (lambda m, c: m == c, lambda m, c: m.endswith("." + c)):  # exact names first
        for i, m in enumerate(modules):
            if any(match(m, c) for c in candidates):
                return i
    return None


def _subtree_end(modules: list[str], index: int) -> int:
    """Index of the last module inside ``modules[index]`` (named_modules order)."""
    prefix, end = modules[index] + ".", index
    while end + 1 < len(modules) and modules[end + 1].startswith(prefix):
        end += 1
    return end


def freeze_stages(body: nn.Module, level_modules: list[str], trainable: int,
                  last_used: int | None = None) -> None:
    """Make only the last ``trainable`` feature stages up to level ``last_used`` (default: the
    last) trainable: requires_grad False for every parameter before them and after level
    ``last_used`` (those receive no gradient).

    Stage j holds the modules after feature level j-1's module up to the end of level j's
    module, in registration order; the first stage holds the stem. ``trainable`` >= the number
    of stages up to ``last_used`` leaves all of them trainable.
    """
    last_used = len(level_modules) - 1 if last_used is None else last_used
    modules = [n for n, _ in body.named_modules()]

    def end_of(level: int) -> int:
        index = _module_index(modules, level_modules[level])
        if index is None:
            raise UserError(f"cannot find feature module {level_modules[level]} in the feature "
                            f"extractor to freeze the stages around it; valid: --trainable-layers"
                            f" {last_used + 1} and --out-indices including level "
                            f"{len(level_modules) - 1}")
        return _subtree_end(modules, index)

    if trainable == 0:
        first = len(modules)
    elif trainable > last_used:
        first = 0
    else:
        first = end_of(last_used - trainable) + 1
    last = len(modules) - 1 if last_used == len(level_modules) - 1 else end_of(last_used)
    position = {n: i for i, n in enumerate(modules)}
    for name, param in body.named_parameters():
        if not first <= position[name.rpartition(".")[0]] <= last:
            param.requires_grad_(False)


def _features_backbone(path: Path, metadata: dict[str, str], trainable_layers: int,
                       out_indices: list[int] | None) -> tuple[nn.Module, list[int]]:
    from timm.layers import freeze_batch_norm_2d

    name = metadata.get("architecture", "?")
    if metadata.get("library") == "module":
        raise UserError(f"{path} was exported from a ready module ({name}), which has no feature "
                        "extractor to rebuild; valid: an export of a timm model or "
                        "torchvision.<name> (e.g. resnet18, torchvision.resnet50)")
    body = load_backbone(path, features_only=True)
    info = body.feature_info
    strides, channels = list(info.reduction()), list(info.channels())
    modules = list(info.module_name())
    levels = len(strides)
    if out_indices is None:
        positions = [i for i, s in enumerate(strides) if s >= 4][-DEFAULT_LEVELS:]
        if not positions:
            raise UserError(f"{path}: {name}'s feature levels have strides {strides}, none >= 4;"
                            " valid: --out-indices with levels from 0.." f"{levels - 1}")
    else:
        positions = [i % levels if -levels <= i < levels else -1 for i in out_indices]
        if min(positions) < 0 or positions != sorted(set(positions)):
            raise UserError(f"--out-indices {','.join(map(str, out_indices))} for {name}: valid:"
                            f" increasing levels from 0..{levels - 1} (strides {strides})")
    body = freeze_batch_norm_2d(body)
    freeze_stages(body, modules, trainable_layers, positions[-1])
    backbone = FeaturesWithFPN(body, positions, [channels[p] for p in positions])
    return backbone, [strides[p] for p in positions]


def anchor_sizes(strides: list[int], base: float) -> list[int]:
    """One anchor size per FPN map (the levels, then the max-pooled one at twice the stride)."""
    return [max(1, round(base * s / 4)) for s in [*strides, 2 * strides[-1]]]


def build_detector(path: str | Path, num_classes: int, trainable_layers: int = 3,
                   out_indices: list[int] | None = None, min_size: int = 800,
                   max_size: int = 1333, anchor_size: float = 32.0, rois_per_image: int = 512,
                   proposals: int = 1000) -> tuple[FasterRCNN, DetectorInfo]:
    """Faster R-CNN (FPN) for ``num_classes`` object classes (background added) on the backbone
    exported at ``path``, with its exported weights loaded exactly.

    ``rois_per_image`` proposals per image train the box head (torchvision: 512);
    ``proposals`` is how many RPN proposals per image the box head sees in evaluation, twice
    that in training (torchvision: 1000 and 2000).
    """
    path = Path(path)
    metadata = read_backbone(path)
    if uses_resnet_fpn(metadata):
        route = "resnet_fpn_backbone"
        backbone, strides = _resnet_backbone(path, metadata, trainable_layers, out_indices)
        levels = out_indices or [1, 2, 3, 4]
    else:
        route = "features"
        backbone, strides = _features_backbone(path, metadata, trainable_layers, out_indices)
        levels = [int(p) for p in backbone.positions]
    sizes = anchor_sizes(strides, anchor_size)
    generator = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    pooler = MultiScaleRoIAlign([str(i) for i in range(len(strides))], output_size=7,
                                sampling_ratio=2)
    model = FasterRCNN(backbone, num_classes=num_classes + 1, min_size=min_size,
                       max_size=max_size, rpn_anchor_generator=generator, box_roi_pool=pooler,
                       box_batch_size_per_image=rois_per_image,
                       rpn_post_nms_top_n_test=proposals, rpn_post_nms_top_n_train=2 * proposals)
    info = DetectorInfo(metadata.get("architecture", "?"), metadata.get("library", "?"), route,
                        list(levels), strides, sizes, trainable_layers)
    return model, info
