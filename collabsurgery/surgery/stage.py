"""A stage: one piece of a cut model, with a train-mode and an eval-mode graph."""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from collabsurgery.surgery.cuts import deinplace_inputs


class Stage(fx.GraphModule):
    """A GraphModule that swaps between a train and an eval graph, like torchvision's
    ``DualGraphModule``, and that survives ``copy.deepcopy`` (which ``DualGraphModule`` does not:
    fx's deepcopy rebuilds a plain GraphModule and drops the eval graph).

    Submodules keep their original dotted names (``layer3.0.conv1``) and are the very module
    objects of ``root``; deep-copy a stage to get independent weights.
    """

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph,
                 deinplace: bool = False):
        super().__init__(root, train_graph, class_name="Stage")
        for node in eval_graph.nodes:  # attributes only the eval graph uses
            if node.op in ("get_attr", "call_module"):
                fx.graph_module._copy_attr(root, self, node.target)
        if deinplace:
            for graph in (train_graph, eval_graph):
                deinplace_inputs(self, graph)
        self.train_graph, self.eval_graph = train_graph, eval_graph
        self.graph = train_graph  # recompiles with any de-inplaced ops

    def train(self, mode: bool = True) -> "Stage":
        """Switch graphs with the mode; recompiles only when the mode changes."""
        if mode != self.training or self.graph is not (self.train_graph if mode else self.eval_graph):
            self.graph = self.train_graph if mode else self.eval_graph
        return super().train(mode)

    def __deepcopy__(self, memo: dict) -> "Stage":
        holder = nn.Module()
        holder._modules = copy.deepcopy(self._modules, memo)
        holder._parameters = copy.deepcopy(self._parameters, memo)
        holder._buffers = copy.deepcopy(self._buffers, memo)
        clone = Stage(holder, copy.deepcopy(self.train_graph), copy.deepcopy(self.eval_graph))
        return clone.train(self.training)
