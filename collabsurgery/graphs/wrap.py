"""``wrap``: turn one backbone (or several, for peers) into a training graph of any kind."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from collabsurgery.graphs.base import GRAPH_KINDS, TrainingGraph, build_graph, builder_arguments
from collabsurgery.models import backbones
from collabsurgery.surgery import split_points, trace


def wrap(model: str | nn.Module | Sequence[str | nn.Module], split: str | Sequence[str] | None = None,
         heads: int | None = None, pattern: str = "tree", num_classes: int | None = None,
         input_size: Sequence[int] | None = None, **kwargs: Any) -> TrainingGraph:
    """Rewrite ``model`` into a training graph of kind ``pattern``.

    Args:
        model: a timm name, ``"torchvision.<name>"`` or an ``nn.Module`` (its parameters become
            head 0's; other copies are freshly initialised unless ``pretrained`` is given); for
            ``pattern="peers"`` a list of them, one per student.
        split: split point names (``"layer2,layer3"`` or a sequence), in execution order.
        heads: number of heads (tree, instances).
        pattern: a registered graph kind: ``"tree"``, ``"instances"``, ``"peers"``, ...
        num_classes: passed to the model factory.
        input_size: (C, H, W) for tracing and costs; default from the model's pretrained_cfg.
        kwargs: arguments of the pattern's builder (``branches``, ``rescale``, ``execution``,
            ``checkpoint_branches``, ...); any other keyword goes to the model factory
            (``drop_path_rate``...). ``pretrained``: a weights file (one of our exports, or a
            ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict) or ``True`` (timm's local
            cache; nothing is downloaded), for peers also a list with one entry per student;
            a classifier for another class count starts fresh. ``copies="pretrained"``
            (default) starts every copy of a branched stage from it, ``"fresh"`` only head 0's
            path (:mod:`collabsurgery.models.pretrained`).
    Returns:
        a :class:`~collabsurgery.graphs.base.TrainingGraph`; ``net(x)`` gives ``[H, B, C]``.
    """
    takes = builder_arguments(pattern)
    if isinstance(kwargs.get("pretrained"), os.PathLike):
        kwargs["pretrained"] = os.fspath(kwargs["pretrained"])
    elif isinstance(kwargs.get("pretrained"), (list, tuple)):
        kwargs["pretrained"] = [os.fspath(p) if isinstance(p, os.PathLike) else p
                                for p in kwargs["pretrained"]]
    # None means "unset" for an argument of any graph kind (branches=None with instances)
    graph_words = {a for kind in GRAPH_KINDS for a in builder_arguments(kind)}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in graph_words}
    # another pattern's argument is refused by name rather than handed to the model factory
    args = {k: v for k, v in kwargs.items() if k in takes or k in graph_words}
    model_kwargs = {k: v for k, v in kwargs.items() if k not in args}
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    for name, value in (("split", split), ("heads", heads), ("input_size", input_size)):
        if value is not None:
            args[name] = value
    if model_kwargs:
        args["model_kwargs"] = model_kwargs
    return build_graph(pattern, model, **args)


def splits(model: str | nn.Module, input_size: Sequence[int] | None = None,
           **model_kwargs: Any) -> list[str]:
    """Clean split points of ``model`` (module names), in execution order."""
    module, _ = backbones.resolve(model, **model_kwargs)
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    return split_points(trace(module, size))
