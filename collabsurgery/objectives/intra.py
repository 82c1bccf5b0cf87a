"""Intra-model collaboration (paper 004, section III): four losses over one network.

L_out (eq. 4) over the dropout views, L_mid (eqs. 5-7) and pull-push (eqs. 8-9) at the graph's
local points (``objectives.local_losses``), kernel decorrelation (eq. 10); each is switched on by
its weight > 0 and they combine freely (the paper's Table III grid). Every term takes soft
targets (mixup, cutmix, label smoothing): see ``objectives.local_losses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.base import INPUT, TrainingGraph
from collabsurgery.graphs.dropout import local_feature
from collabsurgery.objectives.base import (LossContext, NonNegative, Objective, Temperature, Unit,
                                           cross_entropy_per_head, probe, soft_cross_entropy)
from collabsurgery.objectives.local_losses import (LocalClassifier, depth_weights, mid_losses,
                                                   pull_push_losses)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective

#: a weight at the shallowest local point, then at the deepest (linear in between)
DepthPair = Annotated[Sequence[NonNegative], Field(min_length=2, max_length=2)]


def kernel_decorrelation(weight: Tensor) -> Tensor:
    """Eq. 10 for one convolution: ``W`` reshaped to ``F x G`` (one row per filter), each row
    standardised (mean 0, std 1), ``C = W~ W~^T / G``, loss ``||C - diag(C)||_F``: how
    correlated the filters are."""
    rows = weight.flatten(1).float()
    rows = (rows - rows.mean(1, keepdim=True)) / rows.std(1, unbiased=False, keepdim=True) \
        .clamp_min(1e-12)
    c = rows @ rows.T / rows.shape[1]
    return (c - torch.diag(torch.diagonal(c))).norm()


def _module_names(graph: TrainingGraph) -> dict[str, nn.Module]:
    """The graph's modules under the plain model's names (a staged graph's stages keep them)."""
    stages = getattr(graph, "stages", None)
    if stages is None:
        return dict(graph.named_modules())
    names: dict[str, nn.Module] = {}
    for copies in stages:
        names.update(dict(copies[0].named_modules()))
    return names


def _example_dropout(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    """Dropout views at two points with two local points up to the first one."""
    middle = len(points) // 2
    return {"split": [points[middle], points[-1]], "local": [points[middle - 2], points[middle]]}


@register_objective("intra", example=ObjectiveExample(
    kinds=("dropout",), graph={"dropout": _example_dropout},
    args={"mid_weight": 1.0, "pull_push_weight": 0.01, "kernel_weight": 0.01}))
class IntraModelLoss(Objective):
    """The four losses of paper 004, each weighted (0 switches it off), summed.

    L_out, view i of V (eq. 4; eq. 2's J_soft, which has no T^2)::

        q_i  = softmax( (1/(V-1)) sum_{j != i} z_j / T )           # detached
        L_i  = alpha_out CE(y, z_i) + (1 - alpha_out) J_soft(q_i, z_i)
        J_soft(q, z) = (1/B) sum_b -sum_c q[b, c] log softmax(z[b] / T)_c

    the engine averages the views through the dropout graph's loss weight 1/V. With one view the
    soft term is off.

    L_mid and pull-push read the graph's local points (``graph.local = [...]``; pattern dropout
    only): ``sum_i alpha_mid hard_i + beta_mid soft_i`` (:func:`~.local_losses.mid_losses`, one
    :class:`~.local_losses.LocalClassifier` per point) and ``sum_i`` eq. 9
    (:func:`~.local_losses.pull_push_losses`, one 1x1 convolution g_i per point), with alpha_pull
    rising linearly from ``pull[0]`` at the shallowest point to ``pull[1]`` at the deepest and
    alpha_push falling from ``push[0]`` to ``push[1]`` (the paper gives the direction, not the
    values: ours are a choice). Each trains its own module and its point's layer only.

    Kernel decorrelation: the sum of :func:`kernel_decorrelation` over the convolutions named by
    ``kernel_layers`` (module names or prefixes of them, e.g. ``layer4``); by default the
    convolutions of the model's last two groups (:func:`last_conv_groups`), as the paper does:
    "we found it beneficial to use Lkernel only in the last two groups of convolutions for
    VGG-16 and ResNet-18" (section III-D): VGG-16's last six convolutions (two groups of three,
    between its last pools), ResNet-18's layer3 and layer4.

    Losses of the whole step (L_mid, pull-push, kernel) count once per step: each view carries
    its share. Defaults are the paper's: T=2, alpha_out=0.5, alpha_mid=beta_mid=0.05 (K=2 views
    per point is the graph's). The local classifiers and projections are the objective's own
    modules: trained and checkpointed, never exported.
    parts: "hard" = CE, "soft" = J_soft, "mid", "pull_push", "kernel" (their shares per view).
    """

    def __init__(
            self, out_weight: Annotated[NonNegative, Field(
                description="weight of L_out (eq. 4; 0: off)")] = 1.0,
            alpha_out: Annotated[Unit, Field(
                description="weight of CE in L_out; 1 - alpha_out on J_soft")] = 0.5,
            temperature: Temperature = 2.0,
            mid_weight: Annotated[NonNegative, Field(
                description="weight of L_mid (eqs. 5-7; 0: off; needs local points)")] = 0.0,
            alpha_mid: Annotated[NonNegative, Field(
                description="weight of the local classifiers' CE in L_mid")] = 0.05,
            beta_mid: Annotated[NonNegative, Field(
                description="weight of the local classifiers' soft term in L_mid")] = 0.05,
            pull_push_weight: Annotated[NonNegative, Field(
                description="weight of pull-push (eq. 9; 0: off; needs local points)")] = 0.0,
            pull: Annotated[DepthPair, Field(
                description="alpha_pull at the shallowest and the deepest local point")]
            = (0.5, 1.0),
            push: Annotated[DepthPair, Field(
                description="alpha_push at the shallowest and the deepest local point")]
            = (0.5, 0.1),
            kernel_weight: Annotated[NonNegative, Field(
                description="weight of kernel decorrelation (eq. 10; 0: off)")] = 0.0,
            kernel_layers: Annotated[Sequence[str] | None, Field(
                description="modules (or prefixes) whose convolutions are decorrelated "
                            "(default: the model's last two groups)")] = None) -> None:
        super().__init__()
        self.out_weight, self.alpha_out, self.temperature = out_weight, alpha_out, temperature
        self.mid_weight, self.alpha_mid, self.beta_mid = mid_weight, alpha_mid, beta_mid
        self.pull_push_weight, self.pull, self.push = pull_push_weight, tuple(pull), tuple(push)
        self.kernel_weight = kernel_weight
        self.kernel_layers = None if kernel_layers is None else list(kernel_layers)
        self.convolutions: list[nn.Conv2d] = []
        self.points: list[str] = []
        self.classifiers: nn.ModuleList | None = None
        self.projections: nn.ModuleList | None = None
        self.num_classes = 0
        self.share = 1.0

    def attach(self, graph: TrainingGraph) -> None:
        """Build the local modules on the graph's local points and find the kernel layers'
        convolutions; UserError when the graph does not give what a switched-on loss needs."""
        self.share = 1.0 / (graph.num_heads * graph.loss_weight)
        if self.mid_weight or self.pull_push_weight:
            self._attach_local(graph)
        if self.kernel_weight:
            self._attach_kernels(graph)

    def _attach_local(self, graph: TrainingGraph) -> None:
        self.points = list(getattr(graph, "local_points", []))
        if not self.points:
            raise UserError("intra's L_mid and pull-push read local points: use pattern "
                            "'dropout' with local: [<split points before the first dropout "
                            "point>] (`collabsurgery splits MODEL` lists them)")
        self.wants = (INPUT, *(local_feature(p) for p in self.points))
        out = probe(graph, self.wants)
        self.num_classes = out.logits.shape[-1]
        shapes = [tuple(out.features[local_feature(p)].shape[2:]) for p in self.points]
        if any(len(s) != 3 for s in shapes):
            raise UserError(f"intra's local points need image-like features [C, H, W]; got "
                            f"{dict(zip(self.points, shapes))}")
        channels = [s[0] for s in shapes]
        device = out.logits.device
        # built once (a re-attach keeps trained modules of the right size); only those switched
        # on, as a module that never gets a gradient would stall distributed training
        if self.mid_weight and (self.classifiers is None or
                                [c[1].in_channels for c in self.classifiers] != channels):
            self.classifiers = nn.ModuleList(
                LocalClassifier(c, self.num_classes) for c in channels).to(device)
        if self.pull_push_weight and (self.projections is None or
                                      [g.in_channels for g in self.projections] != channels):
            self.projections = nn.ModuleList(nn.Conv2d(c, c, 1) for c in channels).to(device)

    def _attach_kernels(self, graph: TrainingGraph) -> None:
        modules = _module_names(graph)
        if self.kernel_layers is None:
            self.convolutions = last_conv_groups(graph, modules)
            return
        convolutions = []
        for name in self.kernel_layers:
            found = [m for n, m in modules.items() if n == name or n.startswith(name + ".")]
            if not found:
                raise ArgumentError("kernel_layers", f"'{name}' is not a module of the model")
            convs = [m for m in found if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ArgumentError("kernel_layers", f"'{name}' holds no convolution "
                                                     f"({type(found[0]).__name__})")
            convolutions += [c for c in convs if all(c is not k for k in convolutions)]
        self.convolutions = convolutions

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        v, t = logits.shape[0], self.temperature
        hard = cross_entropy_per_head(logits, labels)
        soft = torch.zeros_like(hard)
        if v > 1:
            with torch.no_grad():
                q = torch.softmax((logits.sum(0, keepdim=True) - logits) / (v - 1) / t, dim=-1)
            soft = soft_cross_entropy(q, logits, t) / t**2  # eq. 2: no T^2
        parts = {"hard": hard, "soft": soft}
        total = self.out_weight * (self.alpha_out * hard + (1 - self.alpha_out) * soft)
        example = labels[0]  # the views share the examples: [B] labels or [B, C] targets
        per_step = {"mid": self._mid(logits, example, context) if self.mid_weight else None,
                    "pull_push": self._pull_push(example, context)
                    if self.pull_push_weight else None,
                    "kernel": self._kernel() if self.kernel_weight else None}
        weights = {"mid": self.mid_weight, "pull_push": self.pull_push_weight,
                   "kernel": self.kernel_weight}
        for name, value in per_step.items():
            parts[name] = torch.zeros_like(hard) if value is None else \
                (value * self.share).expand(v)
            total = total + weights[name] * parts[name]
        return total, parts

    def _local_features(self, context: LossContext) -> list[Tensor]:
        if not self.points:
            raise UserError("IntraModelLoss has no local modules yet: call attach(graph) first "
                            "(the engine does)")
        return [context.features[local_feature(p)][0] for p in self.points]

    def _mid(self, logits: Tensor, labels: Tensor, context: LossContext) -> Tensor:
        local = [c(h) for c, h in zip(self.classifiers, self._local_features(context))]
        hard, soft = mid_losses(local, logits.detach().float().mean(0), labels, self.temperature)
        return (self.alpha_mid * hard + self.beta_mid * soft).sum()

    def _pull_push(self, labels: Tensor, context: LossContext) -> Tensor:
        features = self._local_features(context)
        projected = [g(h) for g, h in zip(self.projections, features)]
        n = len(projected)
        return pull_push_losses(projected, context.features[INPUT][0], labels, self.num_classes,
                                depth_weights(self.pull, n), depth_weights(self.push, n)).sum()

    def _kernel(self) -> Tensor:
        if not self.convolutions:
            raise UserError("IntraModelLoss has no kernel layers yet: call attach(graph) first "
                            "(the engine does)")
        return sum(kernel_decorrelation(c.weight) for c in self.convolutions)

    def extra_repr(self) -> str:
        return (f"out_weight={self.out_weight}, alpha_out={self.alpha_out}, "
                f"temperature={self.temperature}, mid_weight={self.mid_weight}, "
                f"alpha_mid={self.alpha_mid}, beta_mid={self.beta_mid}, "
                f"pull_push_weight={self.pull_push_weight}, pull={self.pull}, push={self.push}, "
                f"kernel_weight={self.kernel_weight}, kernel_layers={self.kernel_layers}")


def last_conv_groups(graph: TrainingGraph, modules: dict[str, nn.Module] | None = None,
                     groups: int = 2) -> list[nn.Conv2d]:
    """The 2D convolutions of the model's last ``groups`` groups, in model order.

    A group is the convolutions between two spatial reductions: the graph runs once (on
    :func:`~.base.probe`'s images at its input size) and every convolution is grouped by the
    spatial size of its output; the groups are the sizes in the order the forward pass first
    reaches them, and the last ``groups`` of them are taken. In VGG-16 a group is the
    convolutions between two max pools (the last two: 512 channels at 1/8 and at 1/16, three
    convolutions each); in a ResNet a stage (its strided first convolution and its shortcut
    projection included: both output the stage's size), so ResNet-18's last two are layer3 and
    layer4. ``modules``: the graph's modules by the plain model's names (default: all).
    """
    modules = _module_names(graph) if modules is None else modules
    convs = [m for m in dict.fromkeys(modules.values()) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("kernel decorrelation needs convolutions; the model has none")
    sizes: dict[nn.Module, tuple[int, ...]] = {}  # in the order the forward pass reaches them

    def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
        sizes.setdefault(module, tuple(output.shape[2:]))

    handles = [c.register_forward_hook(record) for c in convs]
    try:
        probe(graph, ())
    finally:
        for handle in handles:
            handle.remove()
    last = set(list(dict.fromkeys(sizes.values()))[-groups:])
    return [c for c in convs if sizes.get(c) in last]
