"""Clean cut points and cutting a traced model into stages.

A node ``s`` is a *clean cut* of a graph when everything computed before ``s`` is consumed at or
before ``s`` (so the rest of the network sees only ``s``), ``s`` yields a single Tensor, no
module with parameters or buffers runs on both sides of ``s``, and something trainable follows.
``get_attr`` nodes of constants are exempt: a later stage simply fetches them again.
A split point must be a clean cut in both the train and the eval graph.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from collabsurgery.errors import UserError
from collabsurgery.surgery.trace import TracedGraph, TracedModel


def _owns_state(module: nn.Module, target: str) -> bool:
    """Whether a call_module/get_attr target holds parameters or buffers (not a constant)."""
    try:
        attr = module.get_submodule(target)
    except AttributeError:
        *path, name = target.split(".")
        attr = getattr(module.get_submodule(".".join(path)), name)
    if isinstance(attr, nn.Module):
        return any(True for _ in attr.parameters()) or any(True for _ in attr.buffers())
    return isinstance(attr, nn.Parameter)


def clean_cuts(traced: TracedGraph, module: nn.Module) -> set[fx.Node]:
    """All nodes of ``traced`` that are clean cut points."""
    nodes = traced.nodes
    pos = {n: i for i, n in enumerate(nodes)}
    last_use_so_far = -1
    first_seen: dict[str, int] = {}
    last_seen: dict[str, int] = {}
    for n in nodes:
        if n.op in ("call_module", "get_attr") and _owns_state(module, n.target):
            first_seen.setdefault(n.target, pos[n])
            last_seen[n.target] = pos[n]
    stateful_spans = [(first_seen[t], last_seen[t]) for t in first_seen]
    last_stateful = max((end for _, end in stateful_spans), default=-1)

    clean = set()
    for n in nodes:
        p = pos[n]
        ok = (
            last_use_so_far <= p
            and n.op in ("call_module", "call_function", "call_method")
            and traced.is_tensor.get(n, False)
            and p < last_stateful
            and not any(start <= p < end for start, end in stateful_spans)
        )
        if ok:
            clean.add(n)
        if n.op != "get_attr":
            last_use_so_far = max([last_use_so_far, *(pos[u] for u in n.users)])
    return clean


def split_points(traced: TracedModel) -> list[str]:
    """Module names that are clean cuts in both graphs, in execution order.

    Several names can stand for one node (``layer1``, ``layer1.2``, ``layer1.2.act3``); the
    outermost is listed, though any of them is accepted by :func:`resolve_splits`.
    """
    clean_train = clean_cuts(traced.train, traced.module)
    clean_eval = clean_cuts(traced.eval, traced.module)
    by_node: dict[fx.Node, str] = {}
    for name, _ in traced.module.named_modules():
        if not name:
            continue
        node_t, node_e = traced.train.resolve(name), traced.eval.resolve(name)
        if node_t in clean_train and node_e in clean_eval and node_t not in by_node:
            by_node[node_t] = name
    order = {n: i for i, n in enumerate(traced.train.nodes)}
    return [by_node[n] for n in sorted(by_node, key=order.__getitem__)]


NO_SPLIT_POINTS = ("none: no single tensor carries the whole state between its blocks; use "
                   "pattern='instances' (whole-model copies, no split points)")


def valid_list(points: Sequence[str]) -> str:
    """Split points for a message: comma-separated, or why there are none and what works."""
    return ", ".join(points) or NO_SPLIT_POINTS


def resolve_splits(traced: TracedModel, names: Sequence[str]) -> list[tuple[fx.Node, fx.Node]]:
    """(train node, eval node) of each split point; a bad or misordered name is a UserError."""
    valid = None
    resolved = []
    for name in names:
        nodes = tuple(g.resolve(name) for g in traced.graphs())
        cuts = [clean_cuts(g, traced.module) for g in traced.graphs()]
        if any(n is None or n not in c for n, c in zip(nodes, cuts)):
            valid = valid or split_points(traced)
            why = "no such module or node" if None in nodes else "not a clean single-tensor cut"
            raise UserError(f"invalid split point '{name}' ({why}); valid split points: "
                            f"{valid_list(valid)}")
        resolved.append(nodes)
    for graph_index, graph in enumerate(traced.graphs()):
        order = {n: i for i, n in enumerate(graph.nodes)}
        positions = [order[pair[graph_index]] for pair in resolved]
        if positions != sorted(set(positions)) or len(set(positions)) != len(positions):
            raise UserError(f"split points {', '.join(names)} must be distinct and in execution "
                            "order (earliest first)")
    return resolved


def cut_graph(graph: fx.Graph, cuts: Sequence[fx.Node]) -> list[fx.Graph]:
    """Cut ``graph`` after each node in ``cuts`` into ``len(cuts) + 1`` stage graphs.

    Stage k > 0 takes the previous cut's tensor as its only input; constants fetched by
    ``get_attr`` are copied into whichever stage uses them.
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    bounds = [-1] + [pos[c] for c in cuts] + [len(nodes) - 1]
    stages = []
    for k in range(len(bounds) - 1):
        stage = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if k > 0:
            env[cuts[k - 1]] = stage.placeholder("x")

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise AssertionError(f"node {n.name} crosses a cut; the cut is not clean")
                env[n] = stage.node_copy(n, lookup)
            return env[n]

        for n in nodes[bounds[k] + 1: bounds[k + 1] + 1]:
            if n.op == "get_attr":
                continue  # copied on first use
            if n.op == "output":
                stage.output(fx.map_arg(n.args[0], lookup))
            else:
                env[n] = stage.node_copy(n, lookup)
        if k < len(cuts):
            stage.output(env[cuts[k]])
        stage.lint()
        stages.append(stage)
    return stages


_OUT_OF_PLACE = {
    **{getattr(torch, name): getattr(torch, name[:-1]) for name in ("relu_", "sigmoid_", "tanh_", "clamp_")},
    operator.iadd: operator.add, operator.isub: operator.sub,
    operator.imul: operator.mul, operator.itruediv: operator.truediv,
}


def deinplace_inputs(stage: fx.GraphModule, graph: fx.Graph) -> None:
    """Make ops that read a stage's input out of place.

    Sibling heads receive the same cut tensor; an in-place op at the start of one head (VGG's
    ``ReLU(inplace=True)`` right after a cut) would corrupt its siblings' input.
    """
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"]:
        for user in list(placeholder.users):
            if user.op == "call_module":
                module = stage.get_submodule(user.target)
                if getattr(module, "inplace", False):
                    safe = copy.copy(module)
                    safe.inplace = False
                    parent, _, leaf = user.target.rpartition(".")
                    setattr(stage.get_submodule(parent), leaf, safe)
            elif user.kwargs.get("inplace", False):
                user.kwargs = {**user.kwargs, "inplace": False}
            elif user.op == "call_method" and user.target.endswith("_") \
                    and not user.target.startswith("_"):
                user.target = user.target[:-1]
            elif user.op == "call_function" and user.target in _OUT_OF_PLACE:
                user.target = _OUT_OF_PLACE[user.target]
