"""Packed execution: the sibling copies of a stage run as one grouped network.

Sibling copies read the same tensor and run the same graph with their own weights, so ``n`` of
them are one network whose channels are ``n`` times wider and split into ``n`` independent
groups: a convolution becomes a grouped convolution (``groups x n``), a BatchNorm over ``n * C``
channels is exactly ``n`` BatchNorms, elementwise ops and per-channel pooling run as they are, and
a Linear becomes a batched matmul. The first convolution reads the *shared* input, so it is one
ordinary convolution with ``n`` times the output channels (the "fused" first layer).

A value of the packed graph is either *shared* (the same for every copy: the input, and anything
computed from it without weights, computed once) or *packed*: ``[B, n * C, ...]``, copy-major
along dim 1. Weights stay owned by the copies: they are concatenated (or stacked) at run time,
so parameters, gradients, ``state_dict`` keys, optimizers and export are unchanged, and each
copy's BatchNorm running statistics are written back after every training-mode call.

What is saved for backward: what the loop saves, plus BatchNorm's concatenated per-channel
vectors (weight, running mean and variance: a few hundred kB for a ResNet-50 branch). Convolutions
and Linears run as :class:`_LeanWeights`, which saves the copies' own parameters (alive anyway)
instead of their concatenation (for a ResNet-50 branch about 95 MB per head in fp32) and
concatenates them again in backward; a shared input that a grouped convolution tiles is saved
once, untiled, and its gradient summed over the copies. Under autocast the weight casts are made
again in backward instead of saved.

Anything outside the supported set raises :class:`Unsupported` when the plan is built; the
caller then runs that stage as a loop of copies.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from collabsurgery.graphs.execution.recompute import Recompute, segment_ends


class Unsupported(Exception):
    """A stage graph contains something the packed (or fused) executor cannot run."""


Value = tuple[Any, bool]  # (value, is packed)

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_CHANNELWISE_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                        nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    torch.sigmoid, F.sigmoid, F.tanh, F.dropout,
}
_CHANNELWISE_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d,
                          F.max_pool2d}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "add_", "mul_",
                        "relu_", "sigmoid_", "contiguous", "clone"}


def tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """A shared tensor as a packed one: ``[B, C, ...]`` -> ``[B, n * C, ...]``."""
    return x.repeat(1, n, *([1] * (x.dim() - 2)))


def unpack(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Each copy's slice of a packed tensor along dim 1.

    Slices are single-view ``narrow``s, so in-place ops on them stay legal. A channel slice of a
    channels_last tensor is neither contiguous nor channels_last, and CPU kernels fed such
    strides have been seen to give wrong gradients (torch 2.x): those slices are made dense.
    """
    size = x.shape[1] // n
    slices = [x.narrow(1, c * size, size) for c in range(n)]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        slices = [s.contiguous(memory_format=torch.channels_last) for s in slices]
    return slices


def _cat_param(modules: Sequence[nn.Module], name: str) -> torch.Tensor | None:
    tensors = [getattr(m, name) for m in modules]
    return None if tensors[0] is None else torch.cat(tensors)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _broadcast(args: list[Value], n: int) -> tuple[list[Any], bool]:
    """Arguments of an elementwise op on packed (and maybe shared) tensors.

    Same-shaped packed tensors and scalars are used as they are. Otherwise every packed tensor
    is viewed as ``[B, n, C, ...]`` and every full-rank shared tensor gets a broadcast dim of
    size 1 there (no copy: the gradient of the broadcast sums over the copies, as the loop's
    does); lower-rank shared tensors broadcast from the right as before.
    Returns the arguments and whether the result must be flattened back from that view.
    """
    packed = [v for v, p in args if p]
    rank, shape = packed[0].dim(), packed[0].shape
    if all(v.shape == shape if p else not isinstance(v, torch.Tensor) or v.dim() == 0
           for v, p in args):
        return [v for v, _ in args], False
    out = []
    for v, p in args:
        if p:
            if v.dim() != rank:
                raise RuntimeError("packed operands of different ranks")
            out.append(v.unflatten(1, (n, -1)))
        elif isinstance(v, torch.Tensor) and v.dim() == rank:
            out.append(v.unsqueeze(1))
        else:
            out.append(v)
    return out, True


class _Slot:
    """An argument that is the value of another node (its index in the environment)."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


class PackedStage:
    """``n`` sibling copies of a stage graph run as one packed network.

    Args:
        copies: the sibling copies (same graph, own weights), in head order.
        graph: the graph to run (the copies' train or eval graph).
    Calling it with the shared input returns the list of each copy's output; with ``recompute``
    (:mod:`.recompute`) each segment of the stage is recomputed on its own in backward.
    """

    def __init__(self, copies: Sequence[fx.GraphModule], graph: fx.Graph):
        self.copies = list(copies)
        self.n = len(self.copies)
        # Steps read and write an environment list by slot, never fx Nodes, so that the plan is
        # plain Python that torch.compile can trace through.
        self.slots = {node: i for i, node in enumerate(graph.nodes)}
        self.steps: list[tuple[int, Callable[[list], Value]]] = []
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise Unsupported("stage has more than one input")
        self.input = self.slots[placeholders[0]]
        for node in graph.nodes:
            if node.op == "output":
                if not isinstance(node.args[0], fx.Node):
                    raise Unsupported("stage output is not a single tensor")
                self.output = self.slots[node.args[0]]
            elif node.op == "get_attr":
                raise Unsupported(f"graph constant '{node.target}'")
            elif node.op != "placeholder":
                self.steps.append((self.slots[node], self._compile(node)))
        # recomputation segments: (index after the segment's last step, its output slot)
        step_of = {slot: i for i, (slot, _) in enumerate(self.steps)}
        ends = [self.slots[n] for n in segment_ends(graph, self.copies[0])] + [self.output]
        self.segments = [(step_of[slot] + 1, slot) for slot in ends]

    def __call__(self, x: torch.Tensor, recompute: Recompute | None = None
                 ) -> list[torch.Tensor]:
        if recompute is None:
            value, packed = self._run(0, len(self.steps), self.input, self.output, (x, False))
        else:
            value, packed = x, False
            source, start = self.input, 0
            for stop, slot in self.segments:
                value, packed = recompute(partial(self._run, start, stop, source, slot),
                                          (value, packed))
                source, start = slot, stop
        return unpack(value, self.n) if packed else [value] * self.n

    def _run(self, start: int, stop: int, source: int, target: int, value: Value) -> Value:
        """Steps ``start:stop`` from ``value`` in slot ``source``; the value of slot ``target``."""
        env: list = [None] * len(self.slots)
        env[source] = value
        for slot, step in self.steps[start:stop]:
            env[slot] = step(env)
        return env[target]

    # -- building ---------------------------------------------------------------------------
    def _modules(self, target: str) -> list[nn.Module]:
        return [c.get_submodule(target) for c in self.copies]

    def _compile(self, node: fx.Node) -> Callable[[list], Value]:
        if node.op == "call_module":
            return self._module_step(node)
        if node.op == "call_function":
            fn = node.target
        else:
            fn = _method(node.target)
        return self._function_step(node, fn)

    def _spec(self, arg: Any) -> Any:
        return _Slot(self.slots[arg]) if isinstance(arg, fx.Node) else arg

    def _args_reader(self, node: fx.Node) -> Callable[[list], tuple[list[Value], dict]]:
        """A function reading ``node``'s arguments from the environment as Values."""
        args = [self._spec(a) for a in node.args]
        kwargs = {k: self._spec(v) for k, v in node.kwargs.items()}

        def read(env: list) -> tuple[list[Value], dict[str, Value]]:
            return ([env[a.i] if isinstance(a, _Slot) else (a, False) for a in args],
                    {k: env[v.i] if isinstance(v, _Slot) else (v, False)
                     for k, v in kwargs.items()})
        return read

    def _module_step(self, node: fx.Node) -> Callable[[list], Value]:
        modules = self._modules(node.target)
        m0 = modules[0]
        if any(type(m) is not type(m0) for m in modules):
            raise Unsupported(f"copies of '{node.target}' differ in type")
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            raise Unsupported(f"module '{node.target}' called with several arguments")
        src, n, target = self.slots[node.args[0]], self.n, node.target
        if isinstance(m0, nn.Conv2d):
            if m0.padding_mode != "zeros":
                raise Unsupported(f"conv '{node.target}' with padding_mode={m0.padding_mode}")

            if isinstance(m0.padding, str):  # "same"/"valid": torch computes the padding
                def conv(env: list) -> Value:
                    x, packed = env[src]
                    groups = m0.groups
                    if packed:
                        groups *= n
                    elif groups > 1:
                        x, groups = tile(x, n), groups * n
                    return F.conv2d(x, _cat_param(modules, "weight"),
                                    _cat_param(modules, "bias"), m0.stride, m0.padding,
                                    m0.dilation, groups), True
                return conv
            return lambda env: (_conv(modules, *env[src]), True)
        if isinstance(m0, nn.modules.batchnorm._BatchNorm):
            return lambda env: (_batch_norm(modules, *env[src]), True)
        if isinstance(m0, nn.Linear):
            return lambda env: (_linear(modules, *env[src]), True)
        if isinstance(m0, nn.Flatten):
            if m0.start_dim < 1:
                raise Unsupported(f"flatten '{node.target}' over the batch/channel dim")
            return lambda env: (m0(env[src][0]), env[src][1])
        if isinstance(m0, _DROPOUT_MODULES):
            def dropout(env: list) -> Value:
                x, packed = env[src]
                if not packed and m0.training and m0.p > 0:
                    x, packed = tile(x, n), True  # every copy draws its own mask
                return m0(x), packed
            return dropout
        if isinstance(m0, _ELEMENTWISE_MODULES + _CHANNELWISE_MODULES):
            if getattr(m0, "return_indices", False):
                raise Unsupported(f"pooling '{node.target}' returns indices")
            return lambda env: (m0(env[src][0]), env[src][1])
        if not _has_state(m0):  # a weight-free module on shared input only (checked at run time)
            def shared_only(env: list) -> Value:
                x, packed = env[src]
                if packed:
                    raise RuntimeError(f"module '{target}' ({type(m0).__name__}) cannot "
                                       "run on packed copies")
                return m0(x), False
            return shared_only
        raise Unsupported(f"module '{node.target}' ({type(m0).__name__})")

    def _function_step(self, node: fx.Node, fn: Callable) -> Callable[[list], Value]:
        if _has_node(node.args, nested=True) or _has_node(node.kwargs, nested=True):
            if fn is torch.cat:
                return self._cat_step(node)
            raise Unsupported(f"'{node.name}' takes nested tensor arguments")
        n, name, read = self.n, node.name, self._args_reader(node)
        method = node.target if node.op == "call_method" else None
        if fn in _ELEMENTWISE_FUNCTIONS or method in _ELEMENTWISE_METHODS:
            kind = "elementwise"
        elif fn in _CHANNELWISE_FUNCTIONS:
            kind = "channelwise"
        elif fn is torch.flatten or method == "flatten":
            kind = "flatten"
        elif fn is torch.mean or method == "mean":
            kind = "mean"
        elif method == "size":
            kind = "size"
        else:
            kind = "shared"  # runs only on shared values; checked at run time

        def step(env: list) -> Value:
            args, kwargs = read(env)
            if not any(p for _, p in args) and not any(p for _, p in kwargs.values()):
                if fn is F.dropout and _dropout_active(args, kwargs):
                    args = [(tile(args[0][0], n), True), *args[1:]]  # a mask per copy
                else:
                    plain_kwargs = {k: v for k, (v, _) in kwargs.items()}
                    return fn(*[v for v, _ in args], **plain_kwargs), False
            if kind == "elementwise":
                keys = list(kwargs)
                values, flat = _broadcast(args + [kwargs[k] for k in keys], n)
                out = fn(*values[:len(args)], **dict(zip(keys, values[len(args):])))
                return (out.flatten(1, 2) if flat else out), True
            plain = [v for v, _ in args]
            plain_kwargs = {k: v for k, (v, _) in kwargs.items()}
            _check_dims(kind, name, plain, plain_kwargs)
            return fn(*plain, **plain_kwargs), kind != "size"
        return step

    def _cat_step(self, node: fx.Node) -> Callable[[list], Value]:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or \
                _has_node(node.args[1:]) or _has_node(node.kwargs):
            raise Unsupported(f"'{node.name}': torch.cat with computed arguments")
        n, tensors = self.n, [self._spec(t) for t in tensors]

        def step(env: list) -> Value:
            values = [env[t.i] if isinstance(t, _Slot) else (t, False) for t in tensors]
            if not any(p for _, p in values):
                return torch.cat([v for v, _ in values], dim), False
            rank = next(v for v, p in values if p).dim()
            d = dim % rank
            if d < 1:
                raise RuntimeError("cat over the batch dim of packed copies")
            parts = []
            for v, p in values:
                v5 = v.unflatten(1, (n, -1)) if p else v.unsqueeze(1).expand(
                    v.shape[0], n, *v.shape[1:])
                parts.append(v5)
            return torch.cat(parts, d + 1).flatten(1, 2), True
        return step


def _has_node(obj: Any, nested: bool = False) -> bool:
    """Whether ``obj`` (a container) holds fx Nodes; ``nested``: only inside inner containers."""
    if isinstance(obj, dict):
        obj = list(obj.values())
    for a in obj:
        if isinstance(a, (list, tuple, dict)):
            if _has_node(a):
                return True
        elif isinstance(a, fx.Node) and not nested:
            return True
    return False


def _method(name: str) -> Callable:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)
    call.__name__ = name
    return call


def _check_dims(kind: str, name: str, args: list, kwargs: dict) -> None:
    """Raise unless an op of ``kind`` leaves dims 0 (batch) and 1 (packed copies) alone."""
    if kind == "channelwise":
        return
    rank = args[0].dim()
    key = {"flatten": "start_dim", "mean": "dim", "size": "dim"}.get(kind)
    if key is None:
        raise RuntimeError(f"'{name}' cannot run on packed copies")
    dims = args[1] if len(args) > 1 else kwargs.get(key, 0 if kind == "flatten" else None)
    dims = [dims] if isinstance(dims, int) else dims
    lowest = {"flatten": 1, "mean": 2, "size": 0}[kind]
    if dims is None or any(d % rank < lowest for d in dims) or \
            (kind == "size" and any(d % rank != 0 for d in dims)):
        raise RuntimeError(f"'{name}' over the batch or channel dim of packed copies")


def _dropout_active(args: list[Value], kwargs: dict[str, Value]) -> bool:
    p = args[1][0] if len(args) > 1 else kwargs.get("p", (0.5, False))[0]
    training = args[2][0] if len(args) > 2 else kwargs.get("training", (True, False))[0]
    return bool(training) and p > 0


def _batch_norm(modules: Sequence[nn.modules.batchnorm._BatchNorm], x: torch.Tensor,
                packed: bool) -> torch.Tensor:
    """``n`` BatchNorms as one over ``n * C`` channels, mirroring ``_BatchNorm.forward``."""
    n, m0 = len(modules), modules[0]
    if not packed:
        x = tile(x, n)
    factor = 0.0 if m0.momentum is None else m0.momentum
    if m0.training and m0.track_running_stats and m0.num_batches_tracked is not None:
        for m in modules:
            m.num_batches_tracked.add_(1)
        if m0.momentum is None:
            factor = 1.0 / float(m0.num_batches_tracked)
    bn_training = m0.training or (m0.running_mean is None and m0.running_var is None)
    use_stats = (not m0.training or m0.track_running_stats) and m0.running_mean is not None
    mean = _cat_param(modules, "running_mean") if use_stats else None
    var = _cat_param(modules, "running_var") if use_stats else None
    out = F.batch_norm(x, mean, var, _cat_param(modules, "weight"), _cat_param(modules, "bias"),
                       bn_training, factor, m0.eps)
    if bn_training and use_stats:  # F.batch_norm updated the concatenated copies in place
        with torch.no_grad():
            for m, a, b in zip(modules, mean.chunk(n), var.chunk(n)):
                m.running_mean.copy_(a)
                m.running_var.copy_(b)
    return out


def _conv(modules: Sequence[nn.Conv2d], x: torch.Tensor, packed: bool) -> torch.Tensor:
    """``n`` Conv2ds as one grouped convolution (a wide one on a shared, ungrouped input)."""
    m0, n = modules[0], len(modules)
    groups = m0.groups * n if packed or m0.groups > 1 else 1
    tiles = n if not packed and m0.groups > 1 else 1  # grouped on a shared input: tile it
    op = _Op("conv", n, tiles, m0.bias is not None, tuple(m0.stride), tuple(m0.padding),
             tuple(m0.dilation), groups)
    return _LeanWeights.apply(op, x, *_params(modules))


def _linear(modules: Sequence[nn.Linear], x: torch.Tensor, packed: bool) -> torch.Tensor:
    """``n`` Linears: one wide Linear on a shared input, a batched matmul on packed input."""
    if packed and x.dim() != 2:
        raise RuntimeError("a Linear on packed copies needs a [B, n * F] input")
    op = _Op("bmm" if packed else "linear", len(modules), 1, modules[0].bias is not None)
    return _LeanWeights.apply(op, x, *_params(modules))


def _params(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The copies' weights, then their biases (if any)."""
    return [m.weight for m in modules] + ([] if modules[0].bias is None else
                                          [m.bias for m in modules])


class _Op(NamedTuple):
    """What a :class:`_LeanWeights` call computes (plain constants, so dynamo traces it)."""

    kind: str  # "conv", "linear" (shared input) or "bmm" (packed input)
    n: int
    tiles: int = 1  # > 1: the input is shared and tiled n times for a grouped convolution
    bias: bool = False
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
        else None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` as autocast casts the inputs of a convolution or matmul."""
    if dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _gather(op: _Op, params: Sequence[torch.Tensor], dtype: torch.dtype | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The copies' weights and biases concatenated (stacked for ``bmm``), cast like autocast."""
    join = torch.stack if op.kind == "bmm" else torch.cat
    weight = _cast(join(list(params[:op.n])), dtype)
    bias = _cast(join(list(params[op.n:])), dtype) if op.bias else None
    return weight, bias


def _forward(op: _Op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> torch.Tensor:
    if op.kind == "conv":
        return F.conv2d(tile(x, op.tiles) if op.tiles > 1 else x, weight, bias, op.stride,
                        op.padding, op.dilation, op.groups)
    if op.kind == "linear":
        return F.linear(x, weight, bias)
    xs = x.unflatten(1, (op.n, -1)).transpose(0, 1)  # [n, B, F]
    w = weight.transpose(1, 2)  # [n, F, O]
    out = torch.bmm(xs, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, w)
    return out.transpose(0, 1).flatten(1)


def _backward(op: _Op, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, mask: list[bool]
              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of input, (concatenated) weight and bias where ``mask`` asks for them."""
    if op.kind == "conv":
        xt = tile(x, op.tiles) if op.tiles > 1 else x
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, xt, weight, [weight.shape[0]] if bias is not None else None, list(op.stride),
            list(op.padding), list(op.dilation), False, [0] * len(op.stride), op.groups, mask)
        if gx is not None and op.tiles > 1:
            gx = gx.unflatten(1, (op.tiles, -1)).sum(1)
        return gx, gw, gb
    if op.kind == "linear":
        g2, x2 = grad.flatten(0, -2), x.flatten(0, -2)
        return (grad.matmul(weight) if mask[0] else None, g2.t().mm(x2) if mask[1] else None,
                g2.sum(0) if mask[2] else None)
    g = grad.unflatten(1, (op.n, -1)).transpose(0, 1)  # [n, B, O]
    xs = x.unflatten(1, (op.n, -1)).transpose(0, 1)
    return (torch.bmm(g, weight).transpose(0, 1).flatten(1) if mask[0] else None,
            torch.bmm(g.transpose(1, 2), xs) if mask[1] else None,
            g.sum(1) if mask[2] else None)


class _LeanWeights(torch.autograd.Function):
    """A convolution or matmul of ``n`` copies on their concatenated weights that saves, for
    backward, the copies' own parameters (alive anyway) instead of the concatenation; backward
    concatenates them again and splits the weight gradient back per copy. A shared input that a
    grouped convolution tiles is saved once, untiled. Under autocast the casts that autocast
    would make are made here (and made again in backward) instead of saved."""

    @staticmethod
    def forward(ctx: Any, op: _Op, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device.type)
        x = _cast(x, dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = _forward(op, x, *_gather(op, params, dtype))
        ctx.op, ctx.dtype = op, dtype
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        op, needs = ctx.op, ctx.needs_input_grad
        n = op.n
        mask = [needs[1], any(needs[2:2 + n]), op.bias and any(needs[2 + n:])]
        weight, bias = _gather(op, params, ctx.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            gx, gw, gb = _backward(op, grad.to(weight.dtype), x, weight, bias, mask)
        grads = _split(gw, params[:n], needs[2:2 + n])
        if op.bias:
            grads += _split(gb, params[n:], needs[2 + n:])
        return None, gx, *grads


def _split(grad: torch.Tensor | None, params: Sequence[torch.Tensor], needs: Sequence[bool]
           ) -> list[torch.Tensor | None]:
    """A concatenated (or stacked) gradient as each copy's, in the copy's dtype."""
    if grad is None:
        return [None] * len(params)
    parts = grad.flatten(0, 1).chunk(len(params)) if grad.dim() > params[0].dim() else \
        grad.chunk(len(params))
    return [g.view_as(p).to(p.dtype) if need else None
            for g, p, need in zip(parts, params, needs)]
