"""Hierarchical dropout views of one network (intra-model collaboration, paper 004, Fig. 1d).

ONE weight set. The backbone is cut at n dropout points; at each point the activation is
sampled ``samples`` (K) times with independent dropout masks, and every later point samples each
of those again, so the network gives K^n views: ``net(x) -> [K^n, B, C]``. The views travel as
one batch of K^j B rows after point j, so work before the first point runs once. In eval mode
dropout is the identity: every view is the same output, the plain model's.

A point is one of the model's own dropout modules (torchvision VGG's classifier has two: K=2
gives the paper's 4 views), sampled with that module's probability, which it then replaces; or
any other split point, after which a dropout of probability ``p`` is inserted. By default the
points are the model's own dropout modules at clean cuts, or, for a model without any, the last
split point (just before the classifier). No copies, so no backprop rescaling (the paper: not
needed here).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backbones
from ..backbones import BackboneSpec
from ..errors import ArgumentError
from ..surgery import split_points, trace
from .base import INPUT, CostPiece, GraphConfig, GraphOutput, TrainingGraph, register_graph
from .build import _config, _parse_split, cut_stages
from .staged import StagedGraph


class MultiDropout(nn.Module):
    """``samples`` independent dropout masks of one activation: ``[N, ...] -> [samples N, ...]``
    (rows ``k N .. (k+1) N - 1`` are sample k) in training; the identity in eval."""

    def __init__(self, samples: int, p: float) -> None:
        super().__init__()
        self.samples, self.p = samples, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return F.dropout(x.repeat(self.samples, *[1] * (x.dim() - 1)), self.p, training=True)

    def extra_repr(self) -> str:
        return f"samples={self.samples}, p={self.p}"


class DropoutViews(StagedGraph):
    """One network whose stages are joined by :class:`MultiDropout`; ``forward`` ->
    ``[samples ** points, B, C]``."""

    execution_modes = ("loop",)
    set_execution = TrainingGraph.set_execution  # one way to run: nothing to choose
    describe_execution = TrainingGraph.describe_execution
    reference_execution = TrainingGraph.reference_execution

    def __init__(self, stages: Sequence[nn.Module], drops: Sequence[MultiDropout],
                 spec: BackboneSpec, reference_keys: Sequence[str], config: GraphConfig,
                 stage_names: Sequence[str], unused_state: dict[str, torch.Tensor] | None = None):
        super().__init__([[s] for s in stages], stage_names, spec, reference_keys, config,
                         unused_state)
        self.drops = nn.ModuleList(drops)

    @property
    def num_heads(self) -> int:
        """Number of views K^n."""
        return math.prod(d.samples for d in self.drops)

    @property
    def loss_weight(self) -> float:
        """1/K^n: the views' losses are averaged (paper 004, eq. 4), with no backprop
        rescaling since every view runs the same weights."""
        return 1.0 / self.num_heads

    def head_path(self, head: int) -> list[int]:
        """Every view runs the one copy of every stage."""
        self.check_head(head)
        return [0] * len(self.stages)

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        """Logits of every view, ``[K^n, B, C]`` (in eval the one output, expanded)."""
        _, x = self.split_input(x)
        self.check_wants(wants, ())
        h = x
        for i, stage in enumerate(self.stages):
            h = stage[0](h)
            if i < len(self.drops):
                h = self.drops[i](h)
        views = h.shape[0] // x.shape[0]
        logits = h.view(views, x.shape[0], *h.shape[1:])
        if views != self.num_heads:  # eval: one deterministic output for every view
            logits = logits.expand(self.num_heads, *logits.shape[1:])
        features = {INPUT: x.expand(self.num_heads, *x.shape)} if INPUT in wants else {}
        return GraphOutput(logits, features)

    @torch.no_grad()
    def cost_pieces(self, x: torch.Tensor) -> list[CostPiece]:
        """Stage i runs once on the K^i-fold batch of views (one copy of its parameters)."""
        pieces, current, runs = [], x, 1
        for i, (name, copies) in enumerate(zip(self.stage_names, self.stages)):
            pieces.append(CostPiece(name, copies[0], current, 1, runs=runs))
            current = copies[0](current)
            if i < len(self.drops):
                runs *= self.drops[i].samples
        return pieces

    def describe_structure(self) -> list[str]:
        """The dropout points and the views they make."""
        points = [f"{name.split('..')[1]} (p={d.p:g})"
                  for name, d in zip(self.stage_names, self.drops)]
        return [f"{self.num_heads} views: {len(self.drops)} dropout point(s) sampled "
                f"{self.drops[0].samples if self.drops else 1} times each: " + ", ".join(points),
                *super().describe_structure()]


def _own_dropouts(module: nn.Module, points: Sequence[str]) -> list[str]:
    """The model's dropout modules whose outputs are clean cuts, in execution order."""
    names = {n for n, m in module.named_modules() if isinstance(m, nn.Dropout)}
    return [p for p in points if p in names]


def _dropout_example(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    return {"split": [points[len(points) // 2], points[-1]], "samples": 2}


@register_graph("dropout", example=_dropout_example)
def build_dropout(model: str | nn.Module, split: str | Sequence[str] | None = None,
                  samples: int = 2, p: float = 0.5, input_size: Sequence[int] | None = None,
                  model_kwargs: dict | None = None) -> DropoutViews:
    """Hierarchical dropout views of ``model`` at the points ``split`` (default: its own dropout
    modules, else its last split point), each sampled ``samples`` times; ``p`` is the
    probability of the dropouts inserted at points that are not dropout modules."""
    split = _parse_split(split)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ArgumentError("samples", f"must be an integer >= 1, got {samples!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ArgumentError("p", f"must be a number in [0, 1), got {p!r}")
    module, spec = backbones.resolve(model, **(model_kwargs or {}))
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    if not split:
        points = split_points(trace(module, size))
        split = tuple(_own_dropouts(module, points) or points[-1:])
    config = _config("dropout", spec, size, split=split, samples=samples, p=p)
    stages, names, unused = cut_stages(module, size, split)
    modules = dict(module.named_modules())
    drops = []
    for point, stage in zip(split, stages):
        own = modules.get(point)
        if isinstance(own, nn.Dropout):  # sampled here instead, with its own probability
            _remove_call(stage, point)
            drops.append(MultiDropout(samples, own.p))
        else:
            drops.append(MultiDropout(samples, float(p)))
    net = DropoutViews(stages, drops, spec, list(module.state_dict().keys()), config, names,
                       unused)
    return net.train(module.training)


def _remove_call(stage: nn.Module, target: str) -> None:
    """Drop the call of module ``target`` from ``stage``'s train graph (its input passes on)."""
    graph = stage.train_graph
    for node in graph.nodes:
        if node.op == "call_module" and node.target == target:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    stage.graph = graph if stage.training else stage.eval_graph
