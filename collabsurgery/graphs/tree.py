"""Tree-shaped training graphs: independent instances, simple and hierarchical ILR sharing.

A tree graph is a chain of stages; stage ``i`` runs ``copies(i) = prod(fanouts[:i+1])`` times.
Every copy of stage ``i`` feeds ``fanouts[i+1]`` copies of stage ``i+1``; each leaf is a head.

- multiple instances (paper 000, Fig. 1b): one stage, the whole model, ``fanouts = (H,)``;
- simple ILR sharing (Fig. 1c): split at one point, ``fanouts = (1, H)``;
- hierarchical ILR sharing (Fig. 1d): several split points, ``fanouts = (1, b1, b2, ...)``.

With ``views`` a tree with shared stages also takes a per-head batch ``[H, B, ...]``: head h runs
its whole path on its own view ``x[h]``, a shared stage once per view (PCL's peers over a shared
trunk, each on its own augmentation). That runs the shared stages H times, each head's path as a
plain loop (the execution modes, recomputation and compiled plans apply to shared batches
only); their parameters, not their activations, are shared.

Head ``h`` runs copy ``h // prod(fanouts[i+1:])`` of stage ``i``. Backprop rescaling (eq. 5)
puts an identity whose gradient is multiplied by ``1 / fanouts[i]`` at each branch point, so the
gradient reaching a shared stage is the *mean* of its children's gradients.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from collabsurgery.graphs.base import INPUT, GraphConfig, GraphOutput
from collabsurgery.graphs.staged import StagedGraph
from collabsurgery.models.backbones import BackboneSpec

RESCALE_MODES = ("backprop", "loss", "none")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient times ``scale`` in the backward pass."""
    return _ScaleGrad.apply(x, scale)


class TreeNet(StagedGraph):
    """A training graph whose heads form a tree of stage copies; ``forward`` -> ``[H, B, C]``.

    ``stages`` are the backbone's pieces (one copy each); copies for the other branches are
    deep copies (the builder re-initialises them). With one stage (``fanouts = (H,)``, the
    multi-instance pattern) every head is a whole model, so a per-head batch ``[H, B, ...]`` is
    accepted: head h runs on ``x[h]``.
    """

    def __init__(self, stages: Sequence[nn.Module], fanouts: Sequence[int], rescale: str,
                 spec: BackboneSpec, reference_keys: Sequence[str], config: GraphConfig,
                 stage_names: Sequence[str], unused_state: dict[str, torch.Tensor] | None = None,
                 views: bool = False):
        if len(stages) != len(fanouts):
            raise ValueError("one fan-out per stage is needed")
        fanouts = tuple(int(f) for f in fanouts)
        copies = [[stage] + [copy.deepcopy(stage) for _ in range(math.prod(fanouts[:i + 1]) - 1)]
                  for i, stage in enumerate(stages)]
        super().__init__(copies, stage_names, spec, reference_keys, config, unused_state)
        self.fanouts = fanouts
        self.rescale = rescale
        self.views = views

    @property
    def num_heads(self) -> int:
        """Number of classifier heads H."""
        return math.prod(self.fanouts)

    @property
    def loss_weight(self) -> float:
        """Factor for each head's loss: 1/H under loss scaling, 1 otherwise."""
        return 1.0 / self.num_heads if self.rescale == "loss" else 1.0

    @property
    def per_head_input(self) -> bool:  # type: ignore[override]
        """Independent instances (one stage) run each head on its own batch; a tree with shared
        stages does so only when built with ``views``."""
        return len(self.fanouts) == 1 or self.views

    @property
    def trunk(self) -> str | None:
        """The first split point when the first stage is shared by every head."""
        return self.feature_names[0] if self.feature_names and self.fanouts[0] == 1 else None

    def head_path(self, head: int) -> list[int]:
        """The copy index of every stage that head ``head`` runs through."""
        self.check_head(head)
        return [head // math.prod(self.fanouts[i + 1:]) for i in range(len(self.fanouts))]

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        """As :meth:`StagedGraph.run`; a per-head batch through shared stages runs head by head
        (each head's path on its own view)."""
        per_head, x = self.split_input(x)
        if not per_head or len(self.fanouts) == 1:
            return super().run(x, wants)
        self.check_wants(wants, self.feature_names)
        outputs = [self._run_path(h, x[h]) for h in range(self.num_heads)]
        features = {name: x if name == INPUT else
                    torch.stack([o[self.feature_names.index(name)] for o in outputs])
                    for name in wants}
        return GraphOutput(torch.stack([o[-1] for o in outputs]), features)

    def _run_path(self, head: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output along head ``head``'s path on ``x`` (rescaled as a shared
        batch's would be at each branch point)."""
        outputs, current = [], x
        for i, copy_index in enumerate(self.head_path(head)):
            if i > 0 and self.fanouts[i] > 1 and self.rescale == "backprop":
                current = scale_grad(current, 1.0 / self.fanouts[i])
            current = self.stages[i][copy_index](current)
            outputs.append(current)
        return outputs

    def forward_stages(self, inputs: list[torch.Tensor] | torch.Tensor) -> list[list[torch.Tensor]]:
        """Outputs of every copy of every stage, stage by stage (the last are the logits)."""
        current = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        outputs: list[list[torch.Tensor]] = []
        for i, fanout in enumerate(self.fanouts):
            if i > 0 and fanout > 1 and self.rescale == "backprop":
                current = [scale_grad(t, 1.0 / fanout) for t in current]
            current = self.executor.run_stage(i, self.stages[i], current)
            outputs.append(current)
        return outputs

    def describe_structure(self) -> list[str]:
        """The fan-outs and rescaling, then the stage table."""
        return [f"fan-outs {self.fanouts}, rescale={self.rescale}", *super().describe_structure()]
