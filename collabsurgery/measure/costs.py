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

from collabsurgery.graphs import TrainingGraph
from collabsurgery.models import backbones
from collabsurgery.surgery.buffers import preserved_buffers


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
    try:
        with preserved_buffers(model), torch.random.fork_rng(devices=[]), \
                saved_tensor_bytes(model) as seen:
            model(x)
    finally:
        model.train(was_training)
    return sum(seen.values()) // x.shape[0]


def _piece_cost(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of one piece of a graph on its input."""
    was_training = module.training
    module.eval()
    with preserved_buffers(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x[:1])
    module.train(was_training)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops()


def measure(model: nn.Module, input_size: tuple[int, int, int]) -> Cost:
    """Cost of ``model`` (plain or training graph) at ``input_size``."""
    params, flops = _piece_cost(model, torch.randn(1, *input_size))
    return Cost(params, flops, _saved_activation_bytes(model, torch.randn(2, *input_size)))


def describe(net: TrainingGraph, plain: nn.Module | None = None) -> str:
    """A table a person can read: how heads share the network, what each piece costs, and the
    totals against the plain model (head 0's backbone).

    Costs are the method's: they are measured with the graph's reference (loop) execution, so
    they do not depend on the execution mode, the thread count or plans built on first use.
    """
    size = net.input_size
    spec = net.head_spec(0)
    plain = plain or backbones.create(spec)
    was_training = net.training
    with net.reference_execution():
        base, graph = measure(plain, size), measure(net, size)
        pieces = net.eval().cost_pieces(torch.zeros(1, *size))
    net.train(was_training)
    models = dict.fromkeys(net.head_spec(h).qualified_name for h in range(net.num_heads))
    lines = [f"training graph: {', '.join(models)} as {net.config.kind}, {net.num_heads} heads, "
             f"input {'x'.join(map(str, size))}", *net.describe_structure(), "",
             f"{'piece':<36} {'copies':>6} {'runs':>5} {'M params':>9} {'GFLOPs/image':>13}"
             "  (each copy, each run)"]
    total_params = total_flops = 0
    for piece in pieces:
        params, flops = _piece_cost(piece.module, piece.input)
        total_params += params * piece.copies
        total_flops += flops * piece.executions
        lines.append(f"{piece.name:<36} {piece.copies:>6} {piece.executions:>5} "
                     f"{params / 1e6:>9.3f} {flops / 1e9:>13.3f}")
    lines.append(f"{'total, every copy and run':<36} {'':>6} {'':>5} {total_params / 1e6:>9.3f} "
                 f"{total_flops / 1e9:>13.3f}")
    lines += ["", f"{'':<22} {'plain':>14} {'training graph':>16} {'ratio':>7}"]
    for label, a, b, unit in (("parameters", base.params, graph.params, 1e6),
                              ("forward GFLOPs/image", base.flops, graph.flops, 1e9),
                              ("activations MB/image", base.activation_bytes,
                               graph.activation_bytes, 1e6)):
        lines.append(f"{label:<22} {a / unit:>14.3f} {b / unit:>16.3f} {b / a:>7.2f}")
    lines.append(f"(plain: head 0's backbone, {spec.qualified_name})")
    return "\n".join(lines)
