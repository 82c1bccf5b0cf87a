"""Fused execution: the first layers of sibling copies that read the cut tensor run as one.

Sibling copies of a stage read the same tensor. Their first convolutions (and Linears) on it are
one convolution with ``n`` times the output channels, weights concatenated at run time from each
copy's own parameters. Each copy then runs a variant of its own stage graph in which those
first-layer nodes are extra inputs (built with torch.fx from the stage's train and eval graphs)
on its slice of the fused output.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from collabsurgery.graphs.execution.packed import Unsupported, unpack


def fusable_nodes(stage: fx.GraphModule, graph: fx.Graph) -> list[fx.Node]:
    """The nodes of ``graph`` that apply a Conv2d (groups=1) or Linear to the stage input."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise Unsupported("stage has more than one input")
    found = []
    for user in inputs[0].users:
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs:
            continue
        module = stage.get_submodule(user.target)
        if isinstance(module, nn.Linear) or (
                isinstance(module, nn.Conv2d) and module.groups == 1
                and module.padding_mode == "zeros"):
            found.append(user)
    if not found:
        raise Unsupported("no convolution or Linear reads the stage input")
    return sorted(found, key=lambda n: n.name)


def variant(stage: fx.GraphModule, graph: fx.Graph, targets: Sequence[str]) -> fx.GraphModule:
    """``stage`` with the nodes calling ``targets`` on its input turned into extra inputs.

    The result shares ``stage``'s submodules (and so its parameters); it is not registered
    anywhere, so it adds nothing to any ``state_dict``.
    """
    graph = copy.deepcopy(graph)
    x = next(n for n in graph.nodes if n.op == "placeholder")
    by_target = {n.target: n for n in x.users if n.op == "call_module"}
    anchor = x
    for i, target in enumerate(targets):
        node = by_target[target]
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"fused_{i}")
        node.replace_all_uses_with(anchor)
        graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(stage, graph, class_name="FusedVariant")


class FusedStage:
    """``n`` sibling copies whose first layers on the shared input run as one wide layer.

    Args:
        copies: the sibling copies (same graph, own weights), in head order.
        training: build from the copies' train graph (else the eval graph).
    Calling it with the shared input returns the list of each copy's output.
    """

    def __init__(self, copies: Sequence[fx.GraphModule], training: bool):
        self.copies = list(copies)
        graph_of = (lambda c: c.train_graph) if training else (lambda c: c.eval_graph)
        self.targets = [n.target for n in fusable_nodes(self.copies[0], graph_of(self.copies[0]))]
        self.variants = [variant(c, graph_of(c), self.targets) for c in self.copies]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = len(self.copies)
        slices = []
        for target in self.targets:
            modules = [c.get_submodule(target) for c in self.copies]
            weight = torch.cat([m.weight for m in modules])
            bias = None if modules[0].bias is None else torch.cat([m.bias for m in modules])
            m0 = modules[0]
            if isinstance(m0, nn.Conv2d):
                y = F.conv2d(x, weight, bias, m0.stride, m0.padding, m0.dilation)
            else:
                y = F.linear(x, weight, bias)
            if isinstance(m0, nn.Conv2d):
                slices.append(unpack(y, n))
            else:
                size = y.shape[-1] // n
                slices.append([y.narrow(-1, c * size, size) for c in range(n)])
        return [v(x, *(s[c] for s in slices)) for c, v in enumerate(self.variants)]
