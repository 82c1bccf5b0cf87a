"""Tree-shaped training graphs: independent instances, simple and hierarchical ILR sharing.

A tree graph is a chain of stages; stage ``i`` runs ``copies(i) = prod(fanouts[:i+1])`` times.
Every copy of stage ``i`` feeds ``fanouts[i+1]`` copies of stage ``i+1``; each leaf is a head.

- multiple instances (paper 000, Fig. 1b): one stage, the whole model, ``fanouts = (H,)``;
- simple ILR sharing (Fig. 1c): split at one point, ``fanouts = (1, H)``;
- hierarchical ILR sharing (Fig. 1d): several split points, ``fanouts = (1, b1, b2, ...)``.

Head ``h`` runs copy ``h // prod(fanouts[i+1:])`` of stage ``i``. Backprop rescaling (eq. 5)
puts an identity whose gradient is multiplied by ``1 / fanouts[i]`` at each branch point, so the
gradient reaching a shared stage is the *mean* of its children's gradients.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backbones import BackboneSpec
from .execution import Executor

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


@dataclass(frozen=True)
class WrapConfig:
    """The arguments that rebuild a training graph from scratch (stored with checkpoints)."""

    model: str
    model_kwargs: dict = field(default_factory=dict)
    split: tuple[str, ...] = ()
    heads: int = 2
    pattern: str = "tree"
    branches: tuple[int, ...] | None = None
    rescale: str = "backprop"
    input_size: tuple[int, int, int] | None = None


class TreeNet(nn.Module):
    """A training graph whose heads form a tree of stage copies; ``forward`` -> ``[H, B, C]``."""

    def __init__(self, stages: Sequence[nn.Module], fanouts: Sequence[int], rescale: str,
                 spec: BackboneSpec, reference_keys: Sequence[str],
                 config: WrapConfig | None = None, stage_names: Sequence[str] = (),
                 unused_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if len(stages) != len(fanouts):
            raise ValueError("one fan-out per stage is needed")
        self.fanouts = tuple(int(f) for f in fanouts)
        self.rescale = rescale
        self.spec = spec
        self.config = config
        self.reference_keys = list(reference_keys)
        self.stage_names = list(stage_names) or [f"stage{i}" for i in range(len(stages))]
        # Entries of the plain state_dict that no stage runs (modules never called in forward):
        # kept as buffers so checkpoints and exports still carry them.
        self.unused = nn.Module()
        self.unused_keys = {}
        for i, (key, value) in enumerate((unused_state or {}).items()):
            self.unused.register_buffer(f"t{i}", value.detach().clone())
            self.unused_keys[key] = f"t{i}"
        self.executor = Executor()
        self.stages = nn.ModuleList()
        for i, stage in enumerate(stages):
            copies = [stage] + [copy.deepcopy(stage) for _ in range(self.copies(i) - 1)]
            self.stages.append(nn.ModuleList(copies))

    @property
    def num_heads(self) -> int:
        """Number of classifier heads H."""
        return math.prod(self.fanouts)

    @property
    def loss_weight(self) -> float:
        """Factor for each head's loss: 1/H under loss scaling, 1 otherwise."""
        return 1.0 / self.num_heads if self.rescale == "loss" else 1.0

    def copies(self, stage: int) -> int:
        """How many copies of stage ``stage`` the graph runs."""
        return math.prod(self.fanouts[: stage + 1])

    def head_path(self, head: int) -> list[int]:
        """The copy index of every stage that head ``head`` runs through."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range; valid: 0..{self.num_heads - 1}")
        return [head // math.prod(self.fanouts[i + 1:]) for i in range(len(self.fanouts))]

    def forward_stages(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Outputs of every copy of every stage, stage by stage (the last are the logits)."""
        outputs: list[list[torch.Tensor]] = []
        current = [x]
        for i, fanout in enumerate(self.fanouts):
            if i > 0 and fanout > 1 and self.rescale == "backprop":
                current = [scale_grad(t, 1.0 / fanout) for t in current]
            current = self.executor.run_stage(self, i, current)
            outputs.append(current)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every head, ``[H, B, C]``, head 0 first."""
        return torch.stack(self.forward_stages(x)[-1])

    def set_execution(self, mode: str | None = None, checkpoint_branches: bool | None = None,
                      compile: bool | dict | None = None) -> "TreeNet":
        """Choose how sibling copies run (``loop``, ``fused``, ``packed``, ``auto``), whether
        branch stages are recomputed in backward and whether each stage's plan is compiled;
        ``None`` keeps a setting. See :mod:`collabsurgery.graphs.execution`."""
        old = self.executor
        self.executor = Executor(
            old.mode if mode is None else mode,
            old.checkpoint_branches if checkpoint_branches is None else checkpoint_branches,
            old.compile if compile is None else compile)
        return self

    def describe_execution(self) -> str:
        """Which mode runs each stage, what auto measured, and why a mode could not run."""
        return self.executor.describe(self)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if "executor" in self.__dict__:  # tensors moved: plans and timings are stale
            self.executor.clear()
        return module

    def head_state_dict(self, head: int) -> dict[str, torch.Tensor]:
        """Head ``head`` as the plain model's state_dict: exactly its keys, in its order."""
        merged: dict[str, torch.Tensor] = {}
        for stage, index in zip(self.stages, self.head_path(head)):
            merged.update(stage[index].state_dict())
        merged.update({key: getattr(self.unused, name) for key, name in self.unused_keys.items()})
        missing = [k for k in self.reference_keys if k not in merged]
        if missing:
            raise KeyError(f"the training graph lacks {len(missing)} keys of the plain model, "
                           f"e.g. {missing[:3]}")
        return {k: merged[k] for k in self.reference_keys}

    def describe_heads(self) -> list[list[int]]:
        """For each stage, which heads share each of its copies."""
        table = []
        for i in range(len(self.fanouts)):
            per_copy = [[] for _ in range(self.copies(i))]
            for h in range(self.num_heads):
                per_copy[self.head_path(h)[i]].append(h)
            table.append(per_copy)
        return table
