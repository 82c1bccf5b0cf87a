"""``wrap``: turn a backbone into a training graph of the requested pattern."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from .. import backbones
from ..errors import UserError
from ..surgery import Stage, cut_graph, resolve_splits, split_points, trace
from .execution import check_mode
from .tree import RESCALE_MODES, TreeNet, WrapConfig

PATTERNS = ("tree", "instances")


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


def _parse_split(split: str | Sequence[str] | None) -> tuple[str, ...]:
    if split is None:
        return ()
    if isinstance(split, str):
        split = split.split(",")
    return tuple(s.strip() for s in split if s.strip())


def _check_arguments(heads: int, pattern: str, rescale: str) -> None:
    if not isinstance(heads, int) or heads < 1:
        raise UserError(f"heads must be an integer >= 1, got {heads!r}")
    if pattern not in PATTERNS:
        raise UserError(f"unknown pattern '{pattern}'; valid: {', '.join(PATTERNS)}")
    if rescale not in RESCALE_MODES:
        raise UserError(f"unknown rescale '{rescale}'; valid: {', '.join(RESCALE_MODES)}")


def _fanouts(heads: int, split: tuple[str, ...], branches: Sequence[int] | None) -> tuple[int, ...]:
    if branches is None:
        branches = even_branches(heads, len(split))
    branches = tuple(int(b) for b in branches)
    if len(branches) != len(split):
        raise UserError(f"branches {branches} must give one fan-out per split point "
                        f"({len(split)}: {', '.join(split)})")
    if any(b < 1 for b in branches) or math.prod(branches) != heads:
        raise UserError(f"branches {branches} must be >= 1 and multiply to heads={heads}")
    return (1, *branches)


def _fresh_state_factory(module: nn.Module, spec: backbones.BackboneSpec
                         ) -> Callable[[], dict[str, torch.Tensor]]:
    """Returns a function drawing a newly initialised state_dict of the same model.

    Copies of a stage must not start from the same weights, or sibling heads that see the same
    input would stay identical. A named model is simply created again by its factory; a ready
    module is deep-copied and every submodule with ``reset_parameters`` is reset.
    """
    if spec.library in ("timm", "torchvision"):
        return lambda: backbones.create(spec).state_dict()

    def reset_copy() -> dict[str, torch.Tensor]:
        fresh = copy.deepcopy(module)
        for sub in fresh.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        return fresh.state_dict()
    return reset_copy


def _reinitialise_copies(net: TreeNet, fresh_state: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Give every stage copy beyond the first its own initial weights."""
    fresh_by_head: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for i, copies in enumerate(net.stages):
            leaves_per_copy = net.num_heads // net.copies(i)
            for c in range(1, len(copies)):
                owner = c * leaves_per_copy  # the first head running this copy
                if owner not in fresh_by_head:
                    fresh_by_head[owner] = fresh_state()
                state = fresh_by_head[owner]
                for key, tensor in copies[c].state_dict(keep_vars=True).items():
                    if key in state:
                        tensor.copy_(state[key])


def wrap(model: str | nn.Module, split: str | Sequence[str] | None = None, heads: int = 2,
         pattern: str = "tree", branches: Sequence[int] | None = None, rescale: str = "backprop",
         num_classes: int | None = None, input_size: Sequence[int] | None = None,
         execution: str = "auto", checkpoint_branches: bool = False,
         **model_kwargs: Any) -> TreeNet:
    """Rewrite ``model`` into a training graph with ``heads`` classifier heads.

    Args:
        model: a timm name, ``"torchvision.<name>"``, or an ``nn.Module`` (whose parameters
            become head 0's; other heads get fresh copies).
        split: split point names (``"layer2,layer3"`` or a sequence), in execution order.
        heads: number of heads H.
        pattern: ``"tree"`` (shared trunk, hierarchical with several splits) or ``"instances"``.
        branches: fan-out at each split point; default an even factorisation of ``heads``.
        rescale: ``"backprop"`` (gradient x 1/children at each branch), ``"loss"`` (1/H per head
            loss, applied by the engine through ``net.loss_weight``) or ``"none"``.
        num_classes: passed to the model factory.
        input_size: (C, H, W) for the tracing probe; default from the model's pretrained_cfg.
        execution: how sibling copies run: ``"loop"``, ``"fused"``, ``"packed"`` or ``"auto"``
            (see :mod:`collabsurgery.graphs.execution`); ``net.set_execution`` changes it later.
        checkpoint_branches: recompute branch stages in backward (activation checkpointing).
        model_kwargs: other factory arguments (``drop_path_rate``...).
    Returns:
        a :class:`TreeNet`; ``net(x)`` gives ``[H, B, C]``.
    """
    split = _parse_split(split)
    _check_arguments(heads, pattern, rescale)
    check_mode(execution)
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    module, spec = backbones.resolve(model, **model_kwargs)
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    config = WrapConfig(spec.qualified_name, dict(spec.kwargs), split, heads, pattern,
                        tuple(branches) if branches is not None else None, rescale, size)
    reference_keys = list(module.state_dict().keys())
    common = dict(rescale=rescale, spec=spec, reference_keys=reference_keys, config=config)

    if pattern == "instances" or (not split and heads == 1):
        if split:
            raise UserError("pattern 'instances' takes no split points (each head is a whole "
                            "model); use pattern 'tree' to share layers")
        net = TreeNet([module], [heads], stage_names=["input..output"], **common)
    else:
        traced = trace(module, size)
        if not split:
            raise UserError(f"pattern 'tree' with {heads} heads needs split points; valid split "
                            f"points: {', '.join(split_points(traced))}")
        fanouts = _fanouts(heads, split, branches)
        cuts = resolve_splits(traced, split)
        train_graphs = cut_graph(traced.train.graph, [t for t, _ in cuts])
        eval_graphs = cut_graph(traced.eval.graph, [e for _, e in cuts])
        stages = [Stage(module, tg, eg, deinplace=i > 0)
                  for i, (tg, eg) in enumerate(zip(train_graphs, eval_graphs))]
        bounds = ["input", *split, "output"]
        names = [f"{a}..{b}" for a, b in zip(bounds, bounds[1:])]
        covered = set().union(*(s.state_dict().keys() for s in stages))
        full_state = module.state_dict()
        unused = {k: full_state[k] for k in reference_keys if k not in covered}
        net = TreeNet(stages, fanouts, stage_names=names, unused_state=unused, **common)
    _reinitialise_copies(net, _fresh_state_factory(module, spec))
    net.set_execution(execution, checkpoint_branches)
    net.train(module.training)
    return net


def rebuild(config: WrapConfig) -> TreeNet:
    """Build the training graph a :class:`WrapConfig` describes (weights freshly initialised)."""
    return wrap(config.model, split=config.split, heads=config.heads, pattern=config.pattern,
                branches=config.branches, rescale=config.rescale, input_size=config.input_size,
                **config.model_kwargs)


def splits(model: str | nn.Module, input_size: Sequence[int] | None = None,
           **model_kwargs: Any) -> list[str]:
    """Clean split points of ``model`` (module names), in execution order."""
    module, _ = backbones.resolve(model, **model_kwargs)
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    return split_points(trace(module, size))
