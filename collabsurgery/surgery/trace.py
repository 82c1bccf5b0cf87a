"""Trace a backbone into train and eval FX graphs with torchvision-style node names.

Node names follow ``torchvision.models.feature_extraction``: a node is named by the dotted path
of the module that produced it, plus the op for non-module nodes (``layer1.0.add``), with a
``_N`` suffix for repeats. A *module name* such as ``layer2`` resolves to the last node executed
inside that module, i.e. the module's output.

Tracer settings are the union of both libraries' own conventions: torchvision's (``math`` and
``torchvision.ops`` are auto-wrapped, ``torchvision.ops`` modules are leaves) and timm's
(``get_notrace_modules()`` are leaves, ``get_notrace_functions()`` are auto-wrapped). Each
setting only affects the classes of its own library, so the union is safe for either.

Optional forward arguments (ViT's ``attn_mask``, Hiera's ``mask``) are traced as constants at
their defaults (``concrete_args``); as graph inputs every block would read them.

Because ``self.training`` branches are frozen into a trace, the model is traced twice, once in
train mode and once in eval mode, like torchvision's ``DualGraphModule``. Each graph is run once
on a small probe batch to learn which nodes yield a single Tensor and how large it is.

Tips for untraceable models are those of torchvision: data-dependent control flow needs
``torch.fx.wrap`` or a leaf module; if nothing helps, ``pattern="instances"`` needs no tracing.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer

from collabsurgery.errors import UserError, first_line
from collabsurgery.models.backbones import default_input_size
from collabsurgery.surgery.buffers import preserved_buffers


@dataclass
class TracedGraph:
    """One FX graph of a model plus what the probe run learned about each node."""

    graph: fx.Graph
    qualnames: dict[fx.Node, str]
    is_tensor: dict[fx.Node, bool] = field(default_factory=dict)
    numel_per_sample: dict[fx.Node, int] = field(default_factory=dict)
    shape: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)  # batch dim included

    @property
    def nodes(self) -> list[fx.Node]:
        """Nodes in execution order."""
        return list(self.graph.nodes)

    def resolve(self, name: str) -> fx.Node | None:
        """The node a module name or node name stands for, or None.

        A module name resolves to its last-executed node; a node name must match exactly.
        """
        found = None
        prefix = name + "."
        for node, qualname in self.qualnames.items():
            if qualname == name or qualname.startswith(prefix):
                found = node
        return found


@dataclass
class TracedModel:
    """A model with its train-mode and eval-mode graphs."""

    module: nn.Module
    train: TracedGraph
    eval: TracedGraph
    input_size: tuple[int, int, int]

    def graphs(self) -> tuple[TracedGraph, TracedGraph]:
        """Both graphs, train first."""
        return self.train, self.eval


def tracer_kwargs() -> dict:
    """Leaf modules and auto-wrapped functions of torchvision and timm together."""
    tv_leaves = [obj for _, obj in inspect.getmembers(torchvision.ops)
                 if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    return {
        "leaf_modules": list(set(tv_leaves) | set(get_notrace_modules())),
        "autowrap_modules": (math, torchvision.ops),
        "autowrap_functions": tuple(get_notrace_functions()),
    }


def optional_arguments(model: nn.Module) -> dict[str, object]:
    """The forward arguments after the input that have defaults (ViT's ``attn_mask``,
    ``is_causal``; Hiera's ``mask``), to be traced as constants at those defaults.

    Traced as graph inputs instead, they would be read by every block, and no point between
    blocks would be a clean cut.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _trace_once(model: nn.Module, training: bool) -> TracedGraph:
    model.train(training)
    tracer = NodePathTracer(**tracer_kwargs())
    try:
        graph = tracer.trace(model, concrete_args=optional_arguments(model) or None)
    except Exception as err:  # FX raises many types for untraceable code
        raise UserError(f"{type(model).__name__} cannot be traced by torch.fx "
                        f"({first_line(err)}); "
                        "pattern='instances' needs no tracing") from None
    return TracedGraph(graph, dict(tracer.node_to_qualname))


class _Recorder(fx.Interpreter):
    """Runs a graph once and notes, per node, whether it produced one Tensor and its size."""

    def __init__(self, module: fx.GraphModule, traced: TracedGraph, batch: int):
        super().__init__(module)
        self.traced, self.batch = traced, batch

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.traced.is_tensor[n] = isinstance(out, torch.Tensor)
        if isinstance(out, torch.Tensor):
            self.traced.numel_per_sample[n] = out.numel() // self.batch
            self.traced.shape[n] = tuple(out.shape)
        return out


def _probe(model: nn.Module, traced: TracedGraph, input_size: tuple[int, int, int],
           training: bool) -> None:
    """Run ``traced`` once on random input without changing the model's state or RNG; a model
    whose output is not one tensor of logits is a UserError."""
    batch = 2  # train-mode BatchNorm needs more than one value per channel
    gm = fx.GraphModule(model, traced.graph)
    gm.train(training)
    try:
        with preserved_buffers(model), torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            x = torch.randn(batch, *input_size)
            out = _Recorder(gm, traced, batch).run(x)
    except Exception as err:
        own = default_input_size(model)
        hint = (f"its own input size is {'x'.join(map(str, own))} (the default when none is "
                "given)" if tuple(own) != tuple(input_size) else "pass a valid input size")
        size = "x".join(map(str, input_size))
        raise UserError(f"{type(model).__name__} failed on a {batch}x{size}"
                        f" probe input ({type(err).__name__}: {first_line(err)}); "
                        f"{hint}") from None
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{type(model).__name__} returns {type(out).__name__}, not one tensor "
                        f"of logits, in {'training' if training else 'eval'} mode; every head "
                        "must return logits (torchvision googlenet and inception_v3: pass "
                        "aux_logits=False)")


def trace(model: nn.Module, input_size: tuple[int, int, int]) -> TracedModel:
    """Trace ``model`` in train and eval mode and probe both graphs on ``input_size``."""
    was_training = model.training
    try:
        train, eval_ = _trace_once(model, True), _trace_once(model, False)
        _probe(model, train, input_size, training=True)
        _probe(model, eval_, input_size, training=False)
    finally:
        model.train(was_training)
    return TracedModel(model, train, eval_, tuple(input_size))
