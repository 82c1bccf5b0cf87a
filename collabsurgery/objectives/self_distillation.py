"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019, section 3): self distillation.

Shallow classifiers at the backbone's stages (the *exits*) learn from the labels, from the
backbone's own (deepest) classifier and from its feature; the backbone keeps its classifier,
which is all an export holds. The reference is the public PyTorch implementation
luanyunteng/pytorch-be-your-own-teacher at 8045079f9933b3dd694dee5294faac0bd8d54fab (a
re-implementation: its README says the paper gives neither the branches' details nor the
hyper-parameters): ``models/resnet.py`` lines 11-25 (``branchBottleNeck``) and 116-140, 182-208
(the exits), ``train.py`` lines 196-228 (the loss), 360-374 (``kd_loss_function``,
``feature_loss_function``) and 63-69 (the defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from collabsurgery.errors import UserError
from collabsurgery.graphs.base import TrainingGraph
from collabsurgery.objectives.base import (LossContext, NonNegative, Objective, Temperature, Unit,
                                           cross_entropy_per_head, probe, soft_cross_entropy)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


def bottleneck(channels_in: int, channels_out: int, kernel: tuple[int, int]) -> nn.Sequential:
    """The reference's ``branchBottleNeck`` (models/resnet.py lines 11-25): 1x1 convolution to
    ``channels_out // 4``, BN, ReLU; a ``kernel`` convolution of stride ``kernel`` (the exit's
    downsampling to the deepest feature), BN, ReLU; 1x1 convolution to ``channels_out``, BN,
    ReLU. The convolutions keep their biases, as there."""
    middle = max(channels_out // 4, 1)
    return nn.Sequential(
        nn.Conv2d(channels_in, middle, 1), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, middle, kernel, stride=kernel), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, channels_out, 1), nn.BatchNorm2d(channels_out), nn.ReLU())


class ExitClassifier(nn.Module):
    """One shallow classifier: bottleneck, global average pooling, fully connected.

    ``[B, C_i, H_i, W_i] -> (logits [B, classes], feature [B, C_D])``: the feature is the pooled
    bottleneck output (the reference's ``middle*_fea``), the hint's student. ``kernel`` is the
    exit's downsampling to the deepest feature per dimension (8, 4, 2 for ResNet-18's layer1..3
    on CIFAR, the reference's kernel sizes), found by :meth:`SelfDistillationLoss.attach`.
    """

    def __init__(self, channels: int, deepest_channels: int, kernel: tuple[int, int],
                 num_classes: int) -> None:
        super().__init__()
        self.bottleneck = bottleneck(channels, deepest_channels, kernel)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(deepest_channels, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.pool(self.bottleneck(x)).flatten(1)
        return self.fc(feature), feature


def pooled(feature: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, C]`` by global average pooling; ``[B, C]`` as it is."""
    return feature.mean((2, 3)) if feature.dim() == 4 else feature


def hint_loss(student: Tensor, teacher: Tensor, mask: bool = False) -> Tensor:
    """``sum_{b, c} (student - teacher)^2``, summed over the batch as the reference does
    (train.py lines 372-374); with ``mask``, only where either is positive, as the reference's
    code (the paper's ``||F_i - F_C||_2^2`` has no mask)."""
    square = (student - teacher) ** 2
    if mask:
        square = square * ((student > 0) | (teacher > 0)).float()
    return square.sum()


def _example_tree(backbone: str, points: Sequence[str]) -> dict[str, object]:
    """One head split at the last three stages before the global pool: two exits and the
    deepest feature (layer1, layer2 -> layer3 in a CIFAR ResNet-20)."""
    stages = [p for p in points if "." not in p and not p.startswith("global_pool")]
    return {"heads": 1, "split": stages[-3:]}


@register_objective("byot", example=ObjectiveExample(kinds=("tree",),
                                                     graph={"tree": _example_tree}))
class SelfDistillationLoss(Objective):
    """BYOT's loss (the paper's section 3) on one network with exits at its split points.

    With the deepest classifier's logits z_C (the backbone's own) and pooled feature F_C (its
    deepest split point, globally average pooled), and at each exit i the shallow classifier's
    logits z_i and pooled bottleneck feature F_i::

        q_C  = softmax(z_C / T)                                   # DETACHED
        L    = (1 - alpha) (CE(y, z_C) + sum_i CE(y, z_i))
             + alpha T^2 sum_i (1/B) sum_b -sum_c q_C[b, c] log softmax(z_i[b] / T)_c
             + lambda sum_i sum_b ||F_i[b] - F_C[b]||_2^2        # F_C DETACHED

    Detached, as in the reference code (train.py lines 210-223: ``temp4.detach()``,
    ``final_fea.detach()``): the deepest classifier's soft targets and its feature are teachers
    only, so the KD and hint terms train the exits and the backbone up to each exit, never the
    deepest classifier or the layers after the last exit through the teacher side. The KD term is
    the soft cross entropy of the reference's ``kd_loss_function`` (KL's gradients; the value
    differs from KL by the teacher's entropy). The hint is summed over the batch and the
    channels, as there (lambda 1e-6 is tuned to that sum); the reference also masks it to where
    either feature is positive, which the paper's equation does not: ``hint_mask`` gives the
    reference's form, the default is the paper's.

    Where the paper is silent the reference decides: the exits' bottleneck (:func:`bottleneck`)
    and where the hint is taken (after pooling), and the defaults alpha = 0.1, lambda = 1e-6,
    T = 3 (train.py lines 63-69; the paper gives no values). Its ``downsample*_1`` layers, built
    but never run, are left out. Every CE takes soft targets (mixup, cutmix, label smoothing);
    the KD and hint terms do not read the labels.

    Exits: ``exits`` (split points of the graph; default all before ``deepest``), each with a
    spatial feature map; the deepest feature is ``deepest`` (default the graph's last split
    point: ``layer4`` of a ResNet, pooled). The graph is one head, pattern tree, split at the
    exits and the deepest point. The exit classifiers are built by :meth:`attach` from the
    features' channels and sizes: trained and checkpointed with the graph, never exported.
    parts: "hard" = CE(y, z_C), "exits_hard" = sum_i CE(y, z_i), "soft" = the KD term before
    alpha (with T^2), "hint" = the hint before lambda.
    """

    def __init__(self, alpha: Annotated[Unit, Field(
                     description="weight of the KD term; 1 - alpha on every classifier's CE")]
                 = 0.1,
                 hint_weight: Annotated[NonNegative, Field(
                     description="lambda: weight of the L2 hint from the deepest feature")]
                 = 1e-6,
                 temperature: Temperature = 3.0,
                 exits: Annotated[Sequence[str] | None, Field(
                     description="split points with a shallow classifier (default: the graph's "
                                 "split points before the deepest)")] = None,
                 deepest: Annotated[str | None, Field(
                     description="the deepest feature, the hint's teacher (default: the graph's "
                                 "last split point)")] = None,
                 hint_mask: Annotated[bool, Field(
                     description="mask the hint to where either feature is positive, as the "
                                 "reference code (the paper: no mask)")] = False) -> None:
        super().__init__()
        self.alpha, self.hint_weight, self.temperature = alpha, hint_weight, temperature
        self.exits = None if exits is None else list(exits)
        self.deepest, self.hint_mask = deepest, hint_mask
        self.exit_points: list[str] = []
        self.deepest_point = ""
        self.classifiers: nn.ModuleList | None = None

    def check_compatible(self, num_heads: int, num_classes: int) -> None:
        """BYOT trains one network: UserError for a graph of several heads."""
        if num_heads != 1:
            raise UserError(f"byot trains one network with shallow classifiers at its stages: "
                            f"use pattern tree with heads: 1, got {num_heads} heads")

    def attach(self, graph: TrainingGraph) -> None:
        """Find the exits and the deepest feature among the graph's split points and build the
        exit classifiers (kept when they fit already, so a checkpoint loads after a re-attach);
        UserError naming what is valid when the graph does not suit."""
        self.check_compatible(graph.num_heads, 0)
        self.deepest_point, self.exit_points = self._points(graph)
        self.wants = (*self.exit_points, self.deepest_point)
        out = probe(graph, self.wants)
        num_classes = out.logits.shape[-1]
        deep = out.features[self.deepest_point].shape[2:]
        if len(deep) not in (1, 3):
            raise UserError(f"byot's deepest feature '{self.deepest_point}' must be a feature map "
                            f"[C, H, W] or a pooled feature [C]; it gives {tuple(deep)}")
        deep_size = tuple(deep[1:]) if len(deep) == 3 else (1, 1)
        shapes = {p: tuple(out.features[p].shape[2:]) for p in self.exit_points}
        flat = {p: s for p, s in shapes.items() if len(s) != 3}
        if flat:
            name, shape = next(iter(flat.items()))
            raise UserError(f"byot exit '{name}' gives {shape}, not a spatial feature map "
                            "[C, H, W] (after global pooling?); valid exits: split points before "
                            "the global pool (`collabsurgery splits MODEL` lists them)")
        sizes = [(s[0], (max(s[1] // deep_size[0], 1), max(s[2] // deep_size[1], 1)), num_classes)
                 for s in shapes.values()]
        built = [] if self.classifiers is None else \
            [(c.bottleneck[0].in_channels, c.bottleneck[3].kernel_size, c.fc.out_features)
             for c in self.classifiers]
        if built != sizes or self.classifiers[0].fc.in_features != deep[0]:
            self.classifiers = nn.ModuleList(
                ExitClassifier(c, deep[0], k, n) for c, k, n in sizes).to(out.logits.device)

    def _points(self, graph: TrainingGraph) -> tuple[str, list[str]]:
        """(deepest point, exits) from the arguments and the graph's split points."""
        points = list(getattr(graph, "feature_names", []))
        if not points:
            raise UserError("byot reads the backbone at its exits and its deepest feature: use "
                            "pattern tree with heads: 1 and split: [<exits>..., <deepest>], e.g. "
                            "[layer1, layer2, layer3, layer4] for a ResNet (`collabsurgery "
                            f"splits MODEL` lists them); got pattern {graph.config.kind} "
                            "without split points")
        deepest = self.deepest or points[-1]
        if deepest not in points:
            raise UserError(f"byot's deepest feature '{deepest}' is not a split point of the "
                            f"graph; valid: {', '.join(points)} (graph.split)")
        before = points[:points.index(deepest)]
        exits = before if self.exits is None else self.exits
        for name in exits:
            if name not in before:
                raise UserError(f"byot exit '{name}' is not a split point of the graph before "
                                f"its deepest feature '{deepest}'; valid: "
                                f"{', '.join(before) or '(none)'} (exits must be in graph.split)")
        if not exits:
            raise UserError(f"byot needs at least one exit before its deepest feature "
                            f"'{deepest}'; add split points before it to graph.split")
        if len(set(exits)) != len(exits):
            raise UserError(f"byot exits must be distinct, got {list(exits)}")
        return deepest, sorted(exits, key=points.index)

    def exit_outputs(self, features: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Each exit's ``(logits [B, classes], pooled feature [B, C_D])``, shallowest first, from
        a graph output's features (head 0's)."""
        if self.classifiers is None:
            raise UserError("SelfDistillationLoss has no exit classifiers yet: call "
                            "attach(graph) first (the engine does)")
        return [c(features[p][0].float()) for c, p in zip(self.classifiers, self.exit_points)]

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.temperature
        outputs = self.exit_outputs(context.features)
        with torch.no_grad():
            q = torch.softmax(logits / t, dim=-1)
            teacher = pooled(context.features[self.deepest_point][0].float())
        hard = cross_entropy_per_head(logits, labels)
        exits_hard = sum(cross_entropy_per_head(z.unsqueeze(0), labels) for z, _ in outputs)
        soft = sum(soft_cross_entropy(q, z.unsqueeze(0), t) for z, _ in outputs)
        hint = sum(hint_loss(f, teacher, self.hint_mask) for _, f in outputs).view(1)
        total = (1 - self.alpha) * (hard + exits_hard) + self.alpha * soft + \
            self.hint_weight * hint
        return total, {"hard": hard, "exits_hard": exits_hard, "soft": soft, "hint": hint}

    def head_roles(self, num_heads: int) -> list[str]:
        return ["deepest classifier"] * num_heads

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, hint_weight={self.hint_weight}, "
                f"temperature={self.temperature}, exits={self.exits}, deepest={self.deepest}, "
                f"hint_mask={self.hint_mask}")
