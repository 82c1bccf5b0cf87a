"""What a training graph costs compared with the plain model: parameters, FLOPs, activations.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one image. Activation memory is
estimated as the bytes of the distinct tensors autograd saves for backward in one train-mode
forward (``saved_tensors_hooks``), parameters excluded; the ratio is what matters.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from . import backbones
from .graphs import TreeNet


@dataclass
class Cost:
    """Parameters, forward FLOPs per image and saved-activation bytes per image of a model."""

    params: int
    flops: int
    activation_bytes: int


@contextmanager
def saved_tensor_bytes(model: nn.Module) -> Iterator[dict[int, int]]:
    """Within the block, record the bytes of every distinct tensor autograd saves for backward.

    Yields a dict storage pointer -> storage bytes; ``model``'s parameters are not counted.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    was_training = model.training
    model.train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]), saved_tensor_bytes(model) as seen:
            model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
    return sum(seen.values()) // x.shape[0]


def measure(model: nn.Module, input_size: tuple[int, int, int]) -> Cost:
    """Cost of ``model`` (plain or training graph) at ``input_size``."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, *input_size))
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    activations = _saved_activation_bytes(model, torch.randn(2, *input_size))
    return Cost(params, counter.get_total_flops(), activations)


def _stage_modules(net: TreeNet, stage: int) -> list[str]:
    """Readable module names a stage runs: top-level names unless a split cuts through one."""
    def leaves(i: int) -> list[str]:
        return [n.target for n in net.stages[i][0].graph.nodes if n.op == "call_module"]

    if not hasattr(net.stages[stage][0], "graph"):  # a whole plain model
        return ["(whole model)"]
    others = {t for i in range(len(net.stages)) if i != stage for t in leaves(i)}
    names: list[str] = []
    for target in leaves(stage):
        top = target.split(".")[0]
        name = top if not any(o.split(".")[0] == top for o in others) else \
            ".".join(target.split(".")[:2])
        if name not in names:
            names.append(name)
    return names


def describe(net: TreeNet, plain: nn.Module | None = None) -> str:
    """A table a person can read: stages, sharing, and the cost ratios against the plain model."""
    size = tuple(net.config.input_size) if net.config and net.config.input_size else (3, 224, 224)
    plain = plain or backbones.create(net.spec)
    base, graph = measure(plain, size), measure(net, size)
    lines = [f"training graph: {net.spec.qualified_name}, {net.num_heads} heads, "
             f"fan-outs {net.fanouts}, rescale={net.rescale}, input {'x'.join(map(str, size))}",
             "", f"{'stage':<24} {'copies':>6}  {'heads per copy':<28} modules"]
    for i, name in enumerate(net.stage_names):
        sharing = " ".join("{" + ",".join(map(str, hs)) + "}" for hs in net.describe_heads()[i])
        lines.append(f"{name:<24} {net.copies(i):>6}  {sharing:<28} "
                     f"{' '.join(_stage_modules(net, i))}")
    lines += ["", f"{'':<22} {'plain':>14} {'training graph':>16} {'ratio':>7}"]
    for label, a, b, unit in (("parameters", base.params, graph.params, 1e6),
                              ("forward GFLOPs/image", base.flops, graph.flops, 1e9),
                              ("activations MB/image", base.activation_bytes,
                               graph.activation_bytes, 1e6)):
        lines.append(f"{label:<22} {a / unit:>14.3f} {b / unit:>16.3f} {b / a:>7.2f}")
    return "\n".join(lines)
