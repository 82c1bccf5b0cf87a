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

Local points (``local=[...]``, paper 004 sections III-B and III-C) are clean cuts up to the first
dropout point where an objective reads a *local* feature, ``"local:<point>"``, for a loss that
must train only the layer that made it. A point's layer is the run of nodes from the last clean
cut before the point's last convolution up to the point (one conv-BN-activation in VGG, one
residual block in a ResNet). The graph cuts there too, and the local feature is that layer run
again on its detached input, its BatchNorm statistics updated on throw-away copies of the buffers
(``torch.func.functional_call``): the local loss's gradient reaches the layer's parameters and
stops at its input, while the main path runs once, as before. The price is one more forward and
backward of that one layer per point, not of the network below it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from collabsurgery.errors import ArgumentError
from collabsurgery.graphs.base import (INPUT, CostPiece, GraphConfig, GraphOutput, TrainingGraph,
                                       register_graph)
from collabsurgery.graphs.build import (Count, InputSize, ModelKwargs, Points, Pretrained,
                                        _config, _parse_split, cut_stages, load_pretrained)
from collabsurgery.graphs.staged import StagedGraph
from collabsurgery.models import backbones
from collabsurgery.models.backbones import BackboneSpec
from collabsurgery.surgery import TracedModel, resolve_splits, split_points, trace


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


LOCAL = "local:"  # prefix of the local feature names: "local:layer2"


def local_feature(point: str) -> str:
    """The feature name of local point ``point``: its layer rerun on the detached input."""
    return LOCAL + point


class DropoutViews(StagedGraph):
    """One network whose stages are joined by :class:`MultiDropout` (or, at a cut that only
    serves a local point, ``nn.Identity``); ``forward`` -> ``[samples ** points, B, C]``.

    ``local_layers`` maps each local point to the stages ``(first, last)`` of its layer."""

    execution_modes = ("loop",)
    set_execution = TrainingGraph.set_execution  # one way to run: nothing to choose
    describe_execution = TrainingGraph.describe_execution
    reference_execution = TrainingGraph.reference_execution

    def __init__(self, stages: Sequence[nn.Module], drops: Sequence[MultiDropout],
                 spec: BackboneSpec, reference_keys: Sequence[str], config: GraphConfig,
                 stage_names: Sequence[str], unused_state: dict[str, torch.Tensor] | None = None,
                 local_layers: dict[str, tuple[int, int]] | None = None):
        super().__init__([[s] for s in stages], stage_names, spec, reference_keys, config,
                         unused_state)
        self.drops = nn.ModuleList(drops)
        self.local_layers = dict(local_layers or {})

    @property
    def samplers(self) -> list[MultiDropout]:
        """The dropout points' samplers, in order."""
        return [d for d in self.drops if isinstance(d, MultiDropout)]

    @property
    def num_heads(self) -> int:
        """Number of views K^n."""
        return math.prod(d.samples for d in self.samplers)

    @property
    def local_points(self) -> list[str]:
        """The local points, earliest first."""
        return list(self.local_layers)

    @property
    def feature_names(self) -> list[str]:
        """Every cut's output, and each local point's local feature."""
        return super().feature_names + [local_feature(p) for p in self.local_layers]

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
        self.check_wants(wants, self.feature_names)
        inputs, outputs, h = [], [], x  # what stage i read; what it gave before any dropout
        for i, stage in enumerate(self.stages):
            inputs.append(h)
            h = stage[0](h)
            outputs.append(h)
            if i < len(self.drops):
                h = self.drops[i](h)
        logits = self._views(h, x.shape[0])
        features = {}
        for name in wants:
            if name == INPUT:
                feature = x
            elif name.startswith(LOCAL):
                feature = self._local(name[len(LOCAL):], inputs, outputs)
            else:
                feature = self._views(outputs[self.feature_names.index(name)], x.shape[0])
            features[name] = feature if feature.dim() > x.dim() else \
                feature.expand(self.num_heads, *feature.shape)
        return GraphOutput(logits, features)

    def _views(self, h: torch.Tensor, batch: int) -> torch.Tensor:
        """``[V B, ...] -> [num_heads, B, ...]``. V < num_heads before the last point or in eval:
        a later point tiles the whole batch (:class:`MultiDropout`), so view ``v`` descends from
        row block ``v % V``."""
        views = h.shape[0] // batch
        h = h.view(views, batch, *h.shape[1:])
        if views == 1:
            return h.expand(self.num_heads, *h.shape[1:])
        return h.repeat(self.num_heads // views, *[1] * (h.dim() - 1))

    def _local(self, point: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]
               ) -> torch.Tensor:
        """Local point ``point``'s layer rerun on its detached input (module docstring)."""
        first, last = self.local_layers[point]
        if not torch.is_grad_enabled():  # nothing to stop: the main path's value is the same
            return outputs[last]
        h = inputs[first].detach()
        for stage in self.stages[first: last + 1]:
            throwaway = {name: b.clone() for name, b in stage[0].named_buffers()}
            h = functional_call(stage[0], throwaway, (h,), strict=False)
        return h

    @torch.no_grad()
    def cost_pieces(self, x: torch.Tensor) -> list[CostPiece]:
        """Stage i runs once on the K^i-fold batch of views (one copy of its parameters)."""
        pieces, current, runs = [], x, 1
        for i, (name, copies) in enumerate(zip(self.stage_names, self.stages)):
            pieces.append(CostPiece(name, copies[0], current, 1, runs=runs))
            current = copies[0](current)
            if i < len(self.drops) and isinstance(self.drops[i], MultiDropout):
                runs *= self.drops[i].samples
        return pieces

    def describe_structure(self) -> list[str]:
        """The dropout points and the views they make."""
        points = [f"{name.split('..')[1]} (p={d.p:g})"
                  for name, d in zip(self.stage_names, self.drops) if isinstance(d, MultiDropout)]
        samplers = self.samplers
        lines = [f"{self.num_heads} views: {len(samplers)} dropout point(s) sampled "
                 f"{samplers[0].samples if samplers else 1} times each: " + ", ".join(points)]
        for point, (first, last) in self.local_layers.items():
            start = self.stage_names[first].split("..")[0]
            lines.append(f"local point {point}: its layer {start}..{point} runs again on its "
                         f"detached input for a local loss, which trains only that layer")
        return [*lines, *super().describe_structure()]


def _own_dropouts(module: nn.Module, points: Sequence[str]) -> list[str]:
    """The model's dropout modules whose outputs are clean cuts, in execution order."""
    names = {n for n, m in module.named_modules() if isinstance(m, nn.Dropout)}
    return [p for p in points if p in names]


def _dropout_example(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    return {"split": [points[len(points) // 2], points[-1]], "samples": 2}


@register_graph("dropout", example=_dropout_example)
def build_dropout(model: str | nn.Module,
                  split: Annotated[Points | None, Field(
                      description="dropout points, in execution order (default: the model's own "
                                  "dropout modules, else its last split point)")] = None,
                  samples: Annotated[Count, Field(
                      description="masks sampled at each dropout point")] = 2,
                  p: Annotated[float, Field(ge=0, lt=1, description=(
                      "probability of the dropouts inserted at points that are not dropout "
                      "modules (the model's own keep theirs)"))] = 0.5,
                  input_size: InputSize = None,
                  local: Annotated[Points | None, Field(
                      description="local points for intra's local losses, e.g. layer1,layer2 "
                                  "(each gets its layer cut out for local backprop)")] = None,
                  pretrained: Pretrained = None,
                  model_kwargs: ModelKwargs = None) -> DropoutViews:
    """Hierarchical dropout views of ``model`` at the points ``split`` (default: its own dropout
    modules, else its last split point), each sampled ``samples`` times; ``p`` is the
    probability of the dropouts inserted at points that are not dropout modules. ``local``:
    points up to the first dropout point that give local features (module docstring).
    ``pretrained``: the one weight set's initial weights (:func:`~.build.build_tree`)."""
    split, local = _parse_split(split), _parse_split(local, "local")
    module, spec = backbones.resolve(model, **(model_kwargs or {}))
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    load_pretrained(module, spec, pretrained, size)
    traced = trace(module, size)
    if not split:
        points = split_points(traced)
        split = tuple(_own_dropouts(module, points) or points[-1:])
    config = _config("dropout", spec, size, split=split, samples=samples, p=p, local=local)
    resolve_splits(traced, split)  # clean cuts, distinct, in order: or a one-line UserError
    layers = _local_layers(traced, split, local)
    cuts = _ordered(traced, [*split, *local, *(s for s in layers.values() if s)])
    stages, names, unused = cut_stages(module, size, cuts)
    modules = dict(module.named_modules())
    drops: list[nn.Module] = []
    for point, stage in zip(cuts, stages):
        own = modules.get(point)
        if point not in split:
            drops.append(nn.Identity())  # a cut for a local layer only
        elif isinstance(own, nn.Dropout):  # sampled here instead, with its own probability
            _remove_call(stage, point)
            drops.append(MultiDropout(samples, own.p))
        else:
            drops.append(MultiDropout(samples, float(p)))
    index = {_position(traced, cut): i for i, cut in enumerate(cuts)}
    spans = {point: (index[_position(traced, start)] + 1 if start else 0,
                     index[_position(traced, point)]) for point, start in layers.items()}
    net = DropoutViews(stages, drops, spec, list(module.state_dict().keys()), config, names,
                       unused, spans)
    return net.train(module.training)


def _position(traced: TracedModel, name: str) -> int:
    return traced.train.nodes.index(traced.train.resolve(name))


def _ordered(traced: TracedModel, names: Sequence[str]) -> list[str]:
    """``names`` in execution order, one name per node (the first given wins)."""
    by_position: dict[int, str] = {}
    for name in names:
        by_position.setdefault(_position(traced, name), name)
    return [by_position[k] for k in sorted(by_position)]


def _is_convolution(traced: TracedModel, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(traced.module.get_submodule(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d)


def _local_layers(traced: TracedModel, split: Sequence[str], local: Sequence[str]
                  ) -> dict[str, str | None]:
    """Each local point's layer start: the last split point before the point's last convolution
    (None: the input). UserError for a point that is no clean cut, comes after a dropout point
    or has no convolution before it."""
    if not local:
        return {}
    resolve_splits(traced, local)
    first_drop = min(_position(traced, s) for s in split)
    nodes = traced.train.nodes
    valid = split_points(traced)
    starts: dict[str, str | None] = {}
    for point in local:
        at = _position(traced, point)
        if at > first_drop:
            raise ArgumentError("local", f"point '{point}' comes after the first dropout point "
                                         f"'{split[0]}'; local points read per-image features")
        convolutions = [i for i in range(at + 1) if _is_convolution(traced, nodes[i])]
        if not convolutions:
            raise ArgumentError("local", f"point '{point}' has no convolution before it: it has "
                                         "no layer to train")
        before = [v for v in valid if _position(traced, v) < convolutions[-1]]
        starts[point] = before[-1] if before else None
    return starts


def _remove_call(stage: nn.Module, target: str) -> None:
    """Drop the call of module ``target`` from ``stage``'s train graph (its input passes on)."""
    graph = stage.train_graph
    for node in graph.nodes:
        if node.op == "call_module" and node.target == target:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    stage.graph = graph if stage.training else stage.eval_graph
