"""The papers' small-image (CIFAR, 32x32) architectures, registered in timm's model registry.

After ``import collabsurgery.models``, ``timm.create_model("cifar_resnet32", num_classes=10)``
works like any timm model: pretrained_cfg (CIFAR input size and statistics), feature_info,
forward_features / forward_head, reset_classifier, features_only, and offline loading of local
weights with ``pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=C)``.

- ``cifar_resnet{20,32,56,110}``: He et al. 2016, three stages of BasicBlocks at 16-32-64
  channels, 1x1 conv + BN projection shortcut where the shape changes ("option B").
- ``cifar_wrn16_2``, ``cifar_wrn28_10``: Zagoruyko & Komodakis 2016, pre-activation wide blocks.
- ``cifar_densenet40_12``: Huang et al. 2017, DenseNet-40 (k=12) without bottleneck/compression.

Every model traces with torch.fx (no control flow on tensor values), and its stage boundaries
(``layer1``, ``layer2``; ``dense1``, ``trans1``, ``dense2``, ``trans2``) are clean cut points.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

__all__ = ["CifarResNet", "CifarWideResNet", "CifarDenseNet"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_STAGES = ("layer", "dense", "trans")  # trunk children checkpointed as a whole


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BN always follows or precedes it)."""
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)


class _CifarNet(nn.Module):
    """Shared timm-style plumbing: sequential trunk, pooled linear head, paper weight init.

    Subclasses build their modules, list the trunk's child names in ``self.trunk`` (executed in
    order by :meth:`forward_features`), set ``feature_info`` and call :meth:`_finish`.
    """

    trunk: List[str]

    def _finish(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """Create the head (``global_pool``, ``fc``) and initialise all weights."""
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = num_features
        self.grad_checkpointing = False
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Regexes grouping parameters into stem and blocks (for layer-wise LR decay)."""
        blocks = r"^(?:layer|dense|trans)(\d+)" if coarse else r"^(?:layer|dense|trans)(\d+)\.(\d+)"
        return dict(stem=r"^conv1\.|^bn1\.", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable activation checkpointing of the stages (layerN, denseN, transN)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier module (or its name, ``"fc"``)."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0 = no classifier)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Run the trunk (stem and all stages, final norm for pre-activation nets): NCHW out."""
        for name in self.trunk:
            module = getattr(self, name)
            if self.grad_checkpointing and name.startswith(_STAGES):
                x = checkpoint(module, x, use_reentrant=False)  # stages only: none is in-place on x
            else:
                x = module(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, optional dropout (``drop_rate``), then ``fc`` unless ``pre_logits``."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, + shortcut, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:  # option B: projection shortcut
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.downsample(x))


class CifarResNet(_CifarNet):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3x3 stem, three stages of ``n`` BasicBlocks."""

    def __init__(self, layers: Sequence[int] = (5, 5, 5), channels: Sequence[int] = (16, 32, 64),
                 num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = _conv3x3(in_chans, channels[0])
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info: List[Dict[str, Any]] = []
        in_chs = channels[0]
        for i, (n, chs) in enumerate(zip(layers, channels)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if j == 0 else chs, chs, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** i, module=f"layer{i + 1}"))
            in_chs = chs
        self.trunk = ["conv1", "bn1", "act1"] + [f"layer{i + 1}" for i in range(len(layers))]
        self._finish(in_chs, num_classes, global_pool, drop_rate)


# ----------------------------------------------------------------------------------- Wide ResNet

class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, + shortcut.

    Where the shape changes the shortcut is a 1x1 conv of the pre-activated input, as in the
    authors' code.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop: nn.Module = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_chs, out_chs)
        self.has_proj = stride != 1 or in_chs != out_chs
        self.shortcut: nn.Module = (nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
                                    if self.has_proj else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward (pre-activation)."""
        o = self.act1(self.bn1(x))
        shortcut = self.shortcut(o) if self.has_proj else x
        out = self.conv2(self.drop(self.act2(self.bn2(self.conv1(o)))))
        return out + shortcut


class CifarWideResNet(_CifarNet):
    """Zagoruyko & Komodakis (2016) WRN-d-k: (d-4)/6 wide blocks per stage at 16k-32k-64k."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 block_drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.in_chans = in_chans
        self.conv1 = _conv3x3(in_chans, 16)
        self.feature_info: List[Dict[str, Any]] = []
        in_chs = 16
        for i, chs in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            stride = 1 if i == 0 else 2
            blocks = [WideBasicBlock(in_chs if j == 0 else chs, chs, stride if j == 0 else 1, block_drop_rate)
                      for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            # The last stage's features are taken after the final BN-ReLU (pre-activation net).
            name = f"layer{i + 1}" if i < 2 else "act"
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** i, module=name))
            in_chs = chs
        self.bn = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)
        self.trunk = ["conv1", "layer1", "layer2", "layer3", "bn", "act"]
        self._finish(in_chs, num_classes, global_pool, drop_rate)


# -------------------------------------------------------------------------------------- DenseNet

class DenseLayer(nn.Sequential):
    """BN-ReLU-conv3x3 producing ``growth_rate`` new channels (optional dropout after)."""

    def __init__(self, in_chs: int, growth_rate: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)
        self.conv = _conv3x3(in_chs, growth_rate)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()


class DenseBlock(nn.Sequential):
    """Dense block by concatenation: each layer sees all previous features, output = all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x <- cat([x, layer(x)]) for every layer; FX-traceable (a loop over modules only)."""
        for layer in self:
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool2x2 between dense blocks (no compression: channels kept)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.pool = nn.AvgPool2d(2)


class CifarDenseNet(_CifarNet):
    """Huang et al. (2017) DenseNet-(3L+4) for CIFAR: three dense blocks of L = (depth-4)/3 layers."""

    def __init__(self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 block_drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3L+4, got {depth}")
        n = (depth - 4) // 3
        self.in_chans = in_chans
        chs = 16
        self.conv1 = _conv3x3(in_chans, chs)
        self.feature_info: List[Dict[str, Any]] = []
        self.trunk = ["conv1"]
        for i in range(3):
            block = DenseBlock(*[DenseLayer(chs + j * growth_rate, growth_rate, block_drop_rate)
                                 for j in range(n)])
            self.add_module(f"dense{i + 1}", block)
            chs += n * growth_rate
            name = f"dense{i + 1}" if i < 2 else "act"
            self.feature_info.append(dict(num_chs=chs, reduction=2 ** i, module=name))
            self.trunk.append(f"dense{i + 1}")
            if i < 2:
                self.add_module(f"trans{i + 1}", Transition(chs, chs))
                self.trunk.append(f"trans{i + 1}")
        self.norm = nn.BatchNorm2d(chs)
        self.act = nn.ReLU(inplace=True)
        self.trunk += ["norm", "act"]
        self._finish(chs, num_classes, global_pool, drop_rate)


# ---------------------------------------------------------------------------------- registration

def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """Default pretrained cfg: CIFAR-10 input and statistics, no remote weights (url empty)."""
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "conv1", "classifier": "fc", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in (
    "cifar_resnet18", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "cifar_resnet110",
    "cifar_wrn16_2", "cifar_wrn28_10", "cifar_densenet40_12")})


def _create(cls: Callable[..., _CifarNet], variant: str, pretrained: bool, stages: int = 3,
            **kwargs: Any) -> _CifarNet:
    """Build through timm (pretrained cfg, local-file weights, features_only)."""
    return build_model_with_cfg(cls, variant, pretrained,
                                feature_cfg=dict(out_indices=tuple(range(stages))), **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for CIFAR (11.2M parameters): 3x3 stem without pooling, four stages of two
    BasicBlocks (64-512 channels), the variant CIFAR papers (paper 002 among them) train."""
    return _create(CifarResNet, "cifar_resnet18", pretrained, stages=4, layers=(2, 2, 2, 2),
                   channels=(64, 128, 256, 512), **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters)."""
    return _create(CifarResNet, "cifar_resnet20", pretrained, layers=(3, 3, 3), **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46M parameters)."""
    return _create(CifarResNet, "cifar_resnet32", pretrained, layers=(5, 5, 5), **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M parameters)."""
    return _create(CifarResNet, "cifar_resnet56", pretrained, layers=(9, 9, 9), **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (1.7M parameters)."""
    return _create(CifarResNet, "cifar_resnet110", pretrained, layers=(18, 18, 18), **kwargs)


@register_model
def cifar_wrn16_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """Wide ResNet-16-2 for CIFAR (0.69M parameters)."""
    return _create(CifarWideResNet, "cifar_wrn16_2", pretrained, depth=16, widen_factor=2, **kwargs)


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """Wide ResNet-28-10 for CIFAR (36.5M parameters)."""
    return _create(CifarWideResNet, "cifar_wrn28_10", pretrained, depth=28, widen_factor=10, **kwargs)


@register_model
def cifar_densenet40_12(pretrained: bool = False, **kwargs: Any) -> CifarDenseNet:
    """DenseNet-40 (growth 12) for CIFAR (1.0M parameters)."""
    return _create(CifarDenseNet, "cifar_densenet40_12", pretrained, depth=40, growth_rate=12, **kwargs)
