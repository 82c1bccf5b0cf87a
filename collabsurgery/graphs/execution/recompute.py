"""Recomputation of branch stages in backward, one segment at a time.

Recomputing a whole stage in backward brings all of its activations back at once, which loses
much of the saving (ResNet-50, 4 heads, batch 8, CPU: a 1.57x peak against 1.69x without
recomputation and 1.49x by segment; docs/benchmarks.md). So a stage is cut into *segments* at
the nodes after which only their own value is live (a ResNet block's output, a VGG
convolution's activation), each with at least one convolution or Linear, and each segment is
checkpointed on its own: the segments' inputs are kept and one segment at a time comes back in
backward.

Settings (``checkpoint_branches``): ``True`` recomputes each segment whole; ``"selective"``
(torch's selective activation checkpointing) keeps what convolutions, matmuls and attention
return and recomputes normalisation, activations, pooling, elementwise ops and packed weight
concatenation. BatchNorm running statistics are restored after a recomputation, so they are
updated exactly once per step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from collabsurgery.errors import ArgumentError
from collabsurgery.surgery.buffers import BufferSnapshot
from collabsurgery.surgery.cuts import cut_graph, deinplace_inputs

# checkpoint_branches values (and their spellings in recipes and graph JSON)
RECOMPUTE: dict[Any, bool | str] = {False: False, None: False, True: True,
                                    "selective": "selective"}
# what selective recomputation saves (aten op names); everything else is recomputed
_SAVED_OPS = {"convolution", "mm", "addmm", "bmm", "baddbmm",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu"}
Recompute = Callable[[Callable[[Any], Any], Any], Any]  # (segment, its input) -> its output


def check_recompute(value: bool | str | None) -> bool | str:
    """``checkpoint_branches`` normalised: False, True (recompute everything) or
    ``"selective"`` (recompute all but convolutions and matmuls); else a UserError."""
    if value in RECOMPUTE:
        return RECOMPUTE[value]
    raise ArgumentError("checkpoint_branches", f"{value!r} is not a recomputation setting; "
                                               "valid: false, true, 'selective'")


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save what the expensive ops (convolutions, matmuls, attention) return; recompute the rest."""
    if op.overloadpacket.__name__ in _SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(fn: Callable[[Any], Any], x: Any, modules: Sequence[nn.Module],
                 setting: bool | str = True) -> Any:
    """``fn(x)`` recomputed in backward (all of it, or only the cheap ops: ``"selective"``), with
    the BatchNorm statistics of ``modules`` updated only by the first forward."""
    calls = 0

    def body(inp: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(inp)
        # recomputation in backward: BatchNorm must not count twice. Outside dispatch modes,
        # because selective checkpointing replays the forward's exact op sequence.
        with _disable_current_modes():
            buffers = BufferSnapshot(*modules)
        try:
            return fn(inp)
        finally:
            with _disable_current_modes():
                buffers.restore()
    context = {} if setting is True else {"context_fn": partial(
        create_selective_checkpoint_contexts, _selective_policy)}
    with _without_autocast_cache(x):
        return checkpoint(body, x, use_reentrant=False, **context)


def _without_autocast_cache(x: Any) -> AbstractContextManager:
    """Autocast as it is, minus its cache of weight casts, for a checkpointed region.

    A weight cast earlier in the step (auto timing the modes, another region) is a cache hit in
    the region's forward, but its recomputation in backward casts again, and checkpoint refuses
    the differing op sequence (pytorch/pytorch#193338). Without the cache both cast; checkpoint
    records the setting and recomputes with it.
    """
    device = next(t.device.type for t in tree_leaves(x) if isinstance(t, torch.Tensor))
    if not torch.is_autocast_enabled(device):
        return nullcontext()
    return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)


def recompute_with(setting: bool | str, modules: Sequence[nn.Module]) -> Recompute:
    """The :data:`Recompute` function of ``setting`` for segments of ``modules``."""
    return lambda segment, x: checkpointed(segment, x, modules, setting)


def _holds_weights(root: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` runs a module with a weight matrix or kernel (a convolution, a Linear;
    not a normalisation's per-channel vectors)."""
    if node.op != "call_module":
        return False
    return any(p.dim() >= 2 for p in root.get_submodule(node.target).parameters())


def segment_ends(graph: fx.Graph, root: nn.Module) -> list[fx.Node]:
    """Nodes of a stage graph to end recomputation segments at: after each, only its own value
    is live (constants fetched by ``get_attr`` aside), and the segment it ends runs a module
    with a weight matrix or kernel. An end moves past the cheap ops that follow it (a block's
    final activation), so that the next segment starts at such a module. The stage's output
    ends the last segment.
    """
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last = next(n for n in nodes if n.op == "output").args[0]
    ends: list[fx.Node] = []
    furthest, weighted = -1, False  # furthest use of anything seen; a module with weights since
    for n in nodes:
        if n.op == "output" or n is last:
            break
        if n.op == "get_attr":
            continue
        weighted |= _holds_weights(root, n)
        if n.op != "placeholder" and furthest <= pos[n] and n.users:
            if weighted:
                ends.append(n)
            elif ends:
                ends[-1] = n
            weighted = False
        furthest = max([furthest, *(pos[u] for u in n.users)])
    return ends


class SegmentedCopy:
    """One copy of a stage as a chain of segments, each recomputed on its own in backward."""

    def __init__(self, stage: fx.GraphModule, graph: fx.Graph):
        self.segments = []
        for k, piece in enumerate(cut_graph(graph, segment_ends(graph, stage))):
            segment = fx.GraphModule(stage, piece)
            if k > 0:  # an in-place op on a segment's input would alter what checkpoint kept
                deinplace_inputs(segment, segment.graph)
                segment.recompile()
            self.segments.append(segment)

    def __call__(self, x: torch.Tensor, recompute: Recompute) -> torch.Tensor:
        for segment in self.segments:
            x = recompute(segment, x)
        return x
