"""Builders of the tree-shaped graph kinds: ``tree`` (shared trunk, hierarchical heads) and
``instances`` (H independent copies of the whole model).

A builder declares each argument once, in its signature: type, range and description
(``Annotated[int, Field(ge=1, description=...)]``). :func:`~.base.build_graph` checks a call
against that declaration; the builder checks only what relates several arguments or the model.
The argument types shared by several graph kinds are declared here.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from collabsurgery.errors import ArgumentError, UserError, warn
from collabsurgery.graphs.base import GraphConfig, register_graph
from collabsurgery.graphs.execution.executor import EXECUTION_MODES
from collabsurgery.graphs.tree import RESCALE_MODES, TreeNet
from collabsurgery.models import backbones, pretrained as pretrained_weights
from collabsurgery.surgery import Stage, cut_graph, resolve_splits, split_points, trace, valid_list


Points = str | Sequence[str]  # split point names: a sequence, or joined by commas
Count = Annotated[int, Field(ge=1)]
Split = Annotated[Points | None, Field(description="split points, in execution order")]
Heads = Annotated[Count, Field(description="number of heads")]
Rescale = Annotated[Literal[RESCALE_MODES], Field(
    description="backprop: gradient x 1/children at each branch point; loss: each head's loss "
                "x 1/H; none")]
InputSize = Annotated[Sequence[Count] | None, Field(
    description="(C, H, W) of one example, for tracing and costs (default: the model's)")]
ModelKwargs = Annotated[dict[str, Any] | None, Field(description="model factory arguments")]
Execution = Annotated[Literal[EXECUTION_MODES], Field(
    description="how sibling copies run (graphs/execution)")]
Recompute = Annotated[bool | Literal["selective"], Field(
    description="recompute branch activations in the backward pass (selective: all but "
                "convolutions and matmuls)")]
Pretrained = Annotated[bool | str | None, Field(
    description="initial weights: a weights file (.safetensors, or a .pth/.pt/.bin state dict) "
                "or true (timm's local cache; nothing is downloaded); a classifier for another "
                "class count starts fresh")]
COPIES_MODES = ("pretrained", "fresh")
Copies = Annotated[Literal[COPIES_MODES], Field(
    description="with pretrained weights, every copy of a branched stage starts from them "
                "(pretrained) or only head 0's path does and the other copies are freshly "
                "initialised (fresh); without, every copy beyond the first is fresh")]


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def even_branches(heads: int, num_splits: int) -> tuple[int, ...]:
    """Spread ``heads`` over ``num_splits`` branch points as evenly as possible.

    Largest prime factors go to the smallest slot; slots are returned in ascending order so
    the deepest split fans out most (4 heads over 2 splits -> (2, 2); 8 -> (2, 4)).
    """
    slots = [1] * num_splits
    for factor in sorted(_prime_factors(heads), reverse=True):
        slots[slots.index(min(slots))] *= factor
    if 1 in slots and heads > 1:
        raise UserError(f"heads={heads} cannot be spread over {num_splits} split points; "
                        "pass branches explicitly (their product must equal heads)")
    return tuple(sorted(slots))


def _parse_split(split: Points | None, name: str = "split") -> tuple[str, ...]:
    if split is None:
        return ()
    if isinstance(split, str):
        split = split.split(",")
    names = tuple(s.strip() for s in split if s.strip())
    if len(set(names)) != len(names):
        raise ArgumentError(name, f"must list distinct split points, got {list(names)}")
    return names


def _fanouts(heads: int, split: tuple[str, ...], branches: Sequence[int] | None) -> tuple[int, ...]:
    branches = tuple(even_branches(heads, len(split)) if branches is None else branches)
    if len(branches) != len(split):
        raise ArgumentError("branches", f"{branches} must give one fan-out per split point "
                                        f"({len(split)}: {', '.join(split)})")
    if math.prod(branches) != heads:
        raise ArgumentError("branches", f"{branches} must multiply to heads={heads}")
    return (1, *branches)


def load_pretrained(module: nn.Module, spec: backbones.BackboneSpec, pretrained: Any,
                    size: Sequence[int], copies: str = "pretrained", heads: int = 1
                    ) -> frozenset[str]:
    """Load ``pretrained`` into ``module`` (:mod:`collabsurgery.models.pretrained`); returns
    the keys every copy keeps from it: those loaded under ``copies="pretrained"``, none under
    ``"fresh"`` (only head 0's path, the module itself, keeps them). Warns when ``heads``
    heads would all start identical (same class count: the classifier loaded too)."""
    loaded = pretrained_weights.load_pretrained(module, spec, pretrained, size)
    if heads > 1 and copies == "pretrained" and loaded >= set(module.state_dict()):
        warn(f"every head starts from the same pretrained weights, {spec.qualified_name}'s "
             "classifier included (same class count): on a shared batch with a symmetric "
             "objective the heads stay identical; set graph.copies=fresh (or copies='fresh') "
             "for heads that differ, or give each head its own input (data.views=per_head)")
    return loaded if copies == "pretrained" else frozenset()


def reinitialise(copies: Sequence[Sequence[nn.Module]], owners: Sequence[Sequence[int]],
                 module: nn.Module, spec: backbones.BackboneSpec,
                 keep: frozenset[str] = frozenset()) -> None:
    """Give every copy ``copies[i][c]`` with ``c >= 1`` the initial weights of the fresh
    instance (:func:`~collabsurgery.models.backbones.fresh_instance`) numbered
    ``owners[i][c]``, except the keys in ``keep`` (pretrained weights every copy starts from)."""
    fresh: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for stage, numbers in zip(copies, owners):
            for c in range(1, len(stage)):
                targets = {k: t for k, t in stage[c].state_dict(keep_vars=True).items()
                           if k not in keep}
                if not targets and keep:  # (without keep: drawn as ever, the same weights)
                    continue
                if numbers[c] not in fresh:
                    fresh[numbers[c]] = backbones.fresh_instance(module, spec).state_dict()
                state = fresh[numbers[c]]
                for key, tensor in targets.items():
                    if key in state:
                        tensor.copy_(state[key])


def _reinitialise_copies(net: TreeNet, module: nn.Module, spec: backbones.BackboneSpec,
                         keep: frozenset[str] = frozenset()) -> None:
    """Give every stage copy beyond the first its own initial weights, but for the pretrained
    keys ``keep``; copies of one head's path share one fresh instance."""
    owners = [[c * (net.num_heads // net.copies(i)) for c in range(net.copies(i))]
              for i in range(len(net.stages))]  # the first head running each copy
    reinitialise(net.stages, owners, module, spec, keep)


def _config(kind: str, spec: backbones.BackboneSpec, size: tuple[int, ...], **args: Any
            ) -> GraphConfig:
    """The JSON config of a graph built from one backbone (tuples stored as lists)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    return GraphConfig(kind, {"model": spec.qualified_name, "model_kwargs": dict(spec.kwargs),
                              "input_size": list(size), **plain})


def _finish(net: TreeNet, module: nn.Module, spec: backbones.BackboneSpec, execution: str,
            checkpoint_branches: bool | str, keep: frozenset[str]) -> TreeNet:
    _reinitialise_copies(net, module, spec, keep)
    net.set_execution(execution, checkpoint_branches)
    net.train(module.training)
    return net


def _tree_example(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    middle = len(points) // 2
    return {"split": [points[middle - 1], points[middle]], "heads": 4}


TreeHeads = Annotated[Count | None, Field(
    description="number of heads (default: the product of branches, else 2 per split point: 2, "
                "4, 8 heads over 1, 2, 3 split points, as paper 000's hierarchical trees)")]


def default_heads(split: Sequence[str], branches: Sequence[int] | None) -> int:
    """A tree's heads when not given: the product of ``branches``, else a fan-out of 2 at each
    split point (1 head without split points: the plain model)."""
    return math.prod(branches) if branches is not None else 2 ** len(split)


@register_graph("tree", example=_tree_example)
def build_tree(model: str | nn.Module, split: Split = None, heads: TreeHeads = None,
               branches: Annotated[Sequence[Count] | None, Field(
                   description="fan-out at each split point, e.g. 2,2; their product is heads "
                               "(default: an even factorisation of heads)")] = None,
               rescale: Rescale = "backprop", input_size: InputSize = None,
               execution: Execution = "auto", checkpoint_branches: Recompute = False,
               pretrained: Pretrained = None, copies: Copies = "pretrained",
               model_kwargs: ModelKwargs = None,
               views: Annotated[bool, Field(
                   description="also take a per-head batch [H, B, ...] (data.views=per_head): "
                               "each head runs its path, shared stages included, on its own "
                               "view")] = False) -> TreeNet:
    """Shared trunk up to the first split point; with several split points the heads branch
    hierarchically, ``branches`` (default: an even factorisation of ``heads``) giving the
    fan-out at each. ``heads=1`` without split points is the plain model.

    ``rescale``: ``"backprop"`` (gradient x 1/children at each branch point), ``"loss"`` (1/H per
    head loss, through ``net.loss_weight``) or ``"none"``; ``execution`` and
    ``checkpoint_branches`` choose how sibling copies run (:mod:`.execution`).

    ``pretrained``: a weights file or true (:mod:`collabsurgery.models.pretrained`); every copy
    starts from it (``copies="pretrained"``) or only head 0's path does (``"fresh"``). The
    config records ``copies`` but not ``pretrained``: a rebuilt graph loads its own weights.
    ``views``: see :mod:`.tree` (recorded in the config only when true).
    """
    split = _parse_split(split)
    heads = default_heads(split, branches) if heads is None else heads
    module, spec = backbones.resolve(model, **(model_kwargs or {}))
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    config = _config("tree", spec, size, split=split, heads=heads,
                     branches=tuple(branches) if branches is not None else None, rescale=rescale,
                     execution=execution, checkpoint_branches=checkpoint_branches, copies=copies,
                     **({"views": True} if views else {}))
    keep = load_pretrained(module, spec, pretrained, size, copies, heads)
    reference_keys = list(module.state_dict().keys())
    if not split:
        if heads > 1:
            raise ArgumentError("split", f"is empty, but pattern 'tree' with {heads} heads needs "
                                         "split points; valid split points: "
                                         f"{valid_list(split_points(trace(module, size)))}")
        net = TreeNet([module], [1], rescale, spec, reference_keys, config, ["input..output"])
        return _finish(net, module, spec, execution, checkpoint_branches, keep)
    fanouts = _fanouts(heads, split, branches)
    stages, names, unused = cut_stages(module, size, split)
    net = TreeNet(stages, fanouts, rescale, spec, reference_keys, config, names, unused, views)
    return _finish(net, module, spec, execution, checkpoint_branches, keep)


def cut_stages(module: nn.Module, size: tuple[int, ...], split: Sequence[str]
               ) -> tuple[list[Stage], list[str], dict[str, torch.Tensor]]:
    """``module`` cut at the split points: its stages (train and eval graphs each), their names
    ``"a..b"``, and the plain state_dict entries no stage runs (kept so exports stay complete)."""
    traced = trace(module, size)
    cuts = resolve_splits(traced, split)
    train_graphs = cut_graph(traced.train.graph, [t for t, _ in cuts])
    eval_graphs = cut_graph(traced.eval.graph, [e for _, e in cuts])
    stages = [Stage(module, tg, eg, deinplace=i > 0)
              for i, (tg, eg) in enumerate(zip(train_graphs, eval_graphs))]
    bounds = ["input", *split, "output"]
    names = [f"{a}..{b}" for a, b in zip(bounds, bounds[1:])]
    covered = set().union(*(s.state_dict().keys() for s in stages))
    full_state = module.state_dict()
    unused = {k: v for k, v in full_state.items() if k not in covered}
    return stages, names, unused


@register_graph("instances", example=lambda backbone, points: {"heads": 2})
def build_instances(model: str | nn.Module, heads: Heads = 2, rescale: Rescale = "backprop",
                    input_size: InputSize = None, execution: Execution = "auto",
                    checkpoint_branches: Recompute = False, pretrained: Pretrained = None,
                    copies: Copies = "pretrained", model_kwargs: ModelKwargs = None) -> TreeNet:
    """``heads`` independent copies of the whole model (paper 000, Fig. 1b); each head may run
    on its own batch (``[H, B, ...]`` input). ``rescale="loss"`` weights each head's loss 1/H.
    ``pretrained``/``copies``: as :func:`build_tree`'s."""
    module, spec = backbones.resolve(model, **(model_kwargs or {}))
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    config = _config("instances", spec, size, heads=heads, rescale=rescale, execution=execution,
                     checkpoint_branches=checkpoint_branches, copies=copies)
    keep = load_pretrained(module, spec, pretrained, size, copies, heads)
    net = TreeNet([module], [heads], rescale, spec, list(module.state_dict().keys()), config,
                  ["input..output"])
    return _finish(net, module, spec, execution, checkpoint_branches, keep)
