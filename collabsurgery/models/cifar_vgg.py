"""VGG with BatchNorm for small images, as paper 004 trains it, registered in timm's registry.

``cifar_vgg11`` and ``cifar_vgg16``: torchvision's VGG layout (``features`` of conv-BN-ReLU and
max pools, module names ``features.N`` as in ``torchvision.models.vgg16_bn``) followed by three
fully connected layers with a dropout of 0.5 after each of the first two, the classifier paper
004 describes ("three fully-connected layers ... Dropout with a probability of 0.5 is used in the
first two layers of classifier"). At 32 px the five pools leave a 1x1 map of 512 channels, so the
classifier is 512 -> 512 -> 512 -> classes; a global pool before it accepts any input size.

Its two classifier dropouts are the hierarchical dropout graph's default points: with ``samples=2``
they give paper 004's four views. Like the other ``cifar_*`` models it is a timm model:
pretrained_cfg (``first_conv`` ``features.0``, ``classifier`` ``classifier.6``), feature_info
(timm's VGG convention: the ReLU before each pool), features_only, forward_features /
forward_head, reset_classifier and local weight files.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from collabsurgery.models.cifar import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["CifarVGG"]

# Channels per convolution, "M" for a 2x2 max pool (Simonyan & Zisserman 2015, configs A and D).
LAYOUTS: Dict[str, Sequence[Union[int, str]]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


class CifarVGG(nn.Module):
    """VGG-BN trunk (``features``), global pool, and a three-layer classifier with two dropouts."""

    def __init__(self, layout: Sequence[Union[int, str]] = LAYOUTS["vgg16"], num_classes: int = 10,
                 in_chans: int = 3, hidden: int = 512, drop_rate: float = 0.5,
                 global_pool: str = "avg") -> None:
        super().__init__()
        layers: List[nn.Module] = []
        self.feature_info: List[Dict[str, Any]] = []
        chs, reduction = in_chans, 1
        for item in layout:
            if item == "M":
                # timm's VGG convention: a stage's feature is the ReLU before its pool.
                self.feature_info.append(dict(num_chs=chs, reduction=reduction,
                                              module=f"features.{len(layers) - 1}"))
                layers.append(nn.MaxPool2d(2, 2))
                reduction *= 2
            else:
                layers += [nn.Conv2d(chs, int(item), 3, padding=1), nn.BatchNorm2d(int(item)),
                           nn.ReLU(inplace=True)]
                chs = int(item)
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.num_features = chs
        self.head_hidden_size = hidden
        self.drop_rate = drop_rate
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        pooled = chs * self.global_pool.feat_mult()
        self.classifier = nn.Sequential(
            nn.Linear(pooled, hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
            nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters: the trunk's layers, then the classifier."""
        return dict(stem=r"^features\.0", blocks=r"^features\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not supported (as timm's VGG): refuses ``enable=True``."""
        if enable:
            raise ValueError("cifar VGG has no gradient checkpointing")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The last classifier layer (or its name, ``"classifier.6"``)."""
        return "classifier.6" if name_only else self.classifier[6]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh last layer for ``num_classes`` (0: none); the hidden layers are kept, so the
        global pool can change only where its output width stays the same."""
        self.num_classes = num_classes
        if global_pool is not None and global_pool != self.global_pool.pool_type:
            pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
            if pool.feat_mult() != self.global_pool.feat_mult():
                raise ValueError(f"global pool '{global_pool}' changes the classifier's input "
                                 "width; build a new model instead")
            self.global_pool = pool
        last = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier[6] = last.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: NCHW out."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, the two hidden layers (with their dropouts), then the last layer unless
        ``pre_logits``."""
        x = self.global_pool(x)
        for i in range(6):  # by index: a slice would be a new module torch.fx cannot trace
            x = self.classifier[i](x)
        return x if pre_logits else self.classifier[6](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """Default pretrained cfg: CIFAR input and statistics, no remote weights (url empty)."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (1, 1),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "features.0", "classifier": "classifier.6", **kwargs,
    }


default_cfgs = generate_default_cfgs({"cifar_vgg11": _cfg(), "cifar_vgg16": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CifarVGG:
    """Build through timm (pretrained cfg, local-file weights, features_only over the flattened
    ``features`` sequence, as timm's VGG)."""
    layout = LAYOUTS[variant.removeprefix("cifar_")]
    return build_model_with_cfg(CifarVGG, variant, pretrained, layout=layout,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def cifar_vgg11(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-11 with BatchNorm for CIFAR (9.8M parameters at 10 classes)."""
    return _create("cifar_vgg11", pretrained, **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16 with BatchNorm for CIFAR (15.2M parameters at 10 classes), paper 004's VGG-16."""
    return _create("cifar_vgg16", pretrained, **kwargs)
