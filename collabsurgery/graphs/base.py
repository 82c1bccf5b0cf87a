"""The training-graph contract: what the engine, export, CLI, bench and studies may rely on.

A training graph turns one batch into the logits of every head::

    graph(x) -> Tensor[H, B, C]                     # head 0 first
    graph.run(x, wants=("layer2",)) -> GraphOutput  # logits + the named features asked for

``x`` is a shared batch ``[B, ...]`` (every head sees the same images) or, for graphs with
``per_head_input``, a per-head batch ``[H, B, ...]`` (head h sees ``x[h]``: its own view or its
own subset). Every graph kind is built by one registered builder from plain arguments; its
:class:`GraphConfig` (kind + those arguments) is JSON, so ``rebuild(config)`` gives the same
graph (freshly initialised) in another process or years later.

Export needs two things per head: :meth:`TrainingGraph.head_spec` (which unmodified backbone
head h is: peers differ) and :meth:`TrainingGraph.head_state_dict` (exactly that backbone's
``state_dict`` keys). Nothing else of a graph leaves the training run.

Words: a *head* is one output; a *student* is a head with its own backbone path (peers, routed);
a *copy* is one instance of a stage.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from collabsurgery.common.arguments import check_arguments, declarations
from collabsurgery.errors import UserError
from collabsurgery.models.backbones import BackboneSpec

INPUT = "input"  # the feature name every graph provides: the batch as given to ``run``


@dataclass(frozen=True)
class GraphConfig:
    """A graph kind and the builder arguments that rebuild it (JSON values only)."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Canonical JSON (tuples become lists)."""
        return json.dumps({"kind": self.kind, "args": self.args}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GraphConfig":
        """Inverse of :meth:`to_json`; UserError if ``text`` is not a graph config."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"graph config is not JSON ({err})") from None
        if not isinstance(raw, dict) or "kind" not in raw or not isinstance(raw.get("args"), dict):
            raise UserError(f"not a graph config (expected {{kind, args}}): {text[:80]}")
        return cls(raw["kind"], raw["args"])


@dataclass
class GraphOutput:
    """What :meth:`TrainingGraph.run` returns.

    logits:   ``[H, B, C]``, head 0 first.
    features: name -> ``[H, B, ...]``, each head's value of that feature (only the names asked
              for; ``"input"`` is the batch as given).
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class CostPiece:
    """A part of a graph's work for cost limits: ``copies`` instances of ``module`` (its
    parameters), run ``runs`` times on ``input`` (default: once per copy); ``in_plain`` when
    the plain model (head 0's backbone) runs it once too."""

    name: str
    module: nn.Module
    input: torch.Tensor
    copies: int
    in_plain: bool = True
    runs: int | None = None

    @property
    def executions(self) -> int:
        """How many times the graph runs this piece in one forward on a shared batch."""
        return self.copies if self.runs is None else self.runs


class TrainingGraph(nn.Module):
    """Base of every training graph. Subclasses set ``config`` and implement
    :attr:`num_heads`, :meth:`run`, :meth:`head_spec` and :meth:`head_state_dict`."""

    config: GraphConfig
    per_head_input: bool = False     # also accepts [H, B, ...]: head h runs on x[h]
    may_skip_modules: bool = False   # some modules unused in a step -> find_unused_parameters
    execution_modes: tuple[str, ...] = ("loop",)

    @property
    def num_heads(self) -> int:
        """Number of heads H."""
        raise NotImplementedError

    @property
    def loss_weight(self) -> float:
        """Factor on the summed head losses (1/H under loss rescaling, else 1)."""
        return 1.0

    @property
    def trunk(self) -> str | None:
        """The feature every head shares (a split point's name: the output of a shared trunk),
        or None when heads share no layers (instances, peers)."""
        return None

    @property
    def input_size(self) -> tuple[int, ...]:
        """The shape of one input example, e.g. (3, 224, 224)."""
        return tuple(self.config.args["input_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every head, ``[H, B, C]``."""
        return self.run(x).logits

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        """Logits and the named features in ``wants`` (computed only when asked for)."""
        raise NotImplementedError

    def run_heads(self, x: torch.Tensor, heads: Sequence[int], source: int | None = None
                  ) -> torch.Tensor:
        """Logits ``[len(heads), B, C]`` of the heads ``heads`` on one shared batch ``x`` (here
        by running every head; graphs override it to run only what those heads need, and may
        reuse what head ``source`` computed on ``x`` in the last run)."""
        return self.run(x).logits[list(heads)]

    def head_spec(self, head: int) -> BackboneSpec:
        """How to rebuild head ``head``'s unmodified backbone."""
        raise NotImplementedError

    def head_state_dict(self, head: int) -> dict[str, torch.Tensor]:
        """Head ``head`` as its plain backbone's state_dict: exactly its keys, in its order."""
        raise NotImplementedError

    def check_head(self, head: int) -> int:
        """``head`` if it is a head index, else IndexError naming the valid range."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range; valid: 0..{self.num_heads - 1}")
        return head

    def split_input(self, x: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """``(per_head, x)``: whether ``x`` is a per-head batch ``[H, B, ...]``; UserError when
        its first dim is not H or this graph takes only a shared batch."""
        per_head = x.dim() == len(self.input_size) + 2
        if per_head and not self.per_head_input:
            raise UserError(f"{type(self).__name__} shares layers between heads and takes one "
                            f"batch [B, {', '.join(map(str, self.input_size))}], got "
                            f"{tuple(x.shape)}")
        if per_head and x.shape[0] != self.num_heads:
            raise UserError(f"a per-head batch must be [H={self.num_heads}, B, ...], got first "
                            f"dim {x.shape[0]} (shape {tuple(x.shape)})")
        return per_head, x

    def check_wants(self, wants: Sequence[str], available: Sequence[str]) -> None:
        """UserError naming a requested feature this graph cannot provide."""
        bad = [w for w in wants if w not in (INPUT, *available)]
        if bad:
            raise UserError(f"{type(self).__name__} has no feature '{bad[0]}'; valid: "
                            f"{', '.join((INPUT, *available))}")

    def cost_pieces(self, x: torch.Tensor) -> list[CostPiece]:
        """The graph's work in pieces for the stage-time limit: modules with their inputs and
        copy counts (stages of head 0's path; each student of a peer group)."""
        raise NotImplementedError

    def set_execution(self, mode: str | None = None,
                      checkpoint_branches: bool | str | None = None,
                      compile: bool | dict | None = None) -> "TrainingGraph":
        """Choose how the graph runs; graphs without alternatives accept only loop/auto."""
        if mode not in (None, "loop", "auto") or checkpoint_branches:
            with_ckpt = " with checkpoint_branches" if checkpoint_branches else ""
            raise UserError(f"{type(self).__name__} has one execution mode (loop); "
                            f"got {mode!r}{with_ckpt}")
        return self

    def describe_execution(self) -> str:
        """How the graph runs, in words."""
        return "execution: loop"

    def execution_choices(self) -> dict[str, dict[str, Any]]:
        """What ``auto`` chose so far, by stage name; a training checkpoint records it so a
        resumed run replays it. Graphs without alternatives choose nothing."""
        return {}

    def replay_execution_choices(self, choices: dict[str, dict[str, Any]]) -> None:
        """Run the recorded ``choices`` (from :meth:`execution_choices`) instead of timing."""

    @contextmanager
    def reference_execution(self) -> Iterator[None]:
        """Within the block the graph runs its reference (loop) execution, with no plan built,
        so costs measured there are the method's, not an execution mode's."""
        yield

    def describe_structure(self) -> list[str]:
        """Lines that show how heads share the network (for ``collabsurgery wrap``)."""
        return []


Builder = Callable[..., TrainingGraph]
GRAPH_KINDS: dict[str, Builder] = {}
Example = Callable[[str, Sequence[str]], dict[str, Any]]
EXAMPLES: dict[str, Example] = {}


def register_graph(kind: str, example: Example) -> Callable[[Builder], Builder]:
    """Register ``builder(model, **args) -> TrainingGraph`` under ``kind``.

    The builder declares its arguments in its signature, types and ranges included
    (``heads: Annotated[int, Field(ge=1, description=...)] = 2``): :func:`build_graph` checks
    every call against it, recipes check their ``graph`` section and the CLI makes its options
    from it. ``example(backbone, split_points) -> args`` gives small arguments for the contract
    tests, so a new kind is covered by registering it. A kind registered twice is an error.
    """
    def decorate(builder: Builder) -> Builder:
        if kind in GRAPH_KINDS:
            raise ValueError(f"graph kind '{kind}' is already registered")
        GRAPH_KINDS[kind] = builder
        EXAMPLES[kind] = example
        return builder
    return decorate


def builder_for(kind: str) -> Builder:
    """The builder of ``kind``; UserError naming the registered kinds."""
    if kind not in GRAPH_KINDS:
        raise UserError(f"unknown pattern '{kind}'; valid: {', '.join(GRAPH_KINDS)}")
    return GRAPH_KINDS[kind]


def builder_arguments(kind: str) -> list[str]:
    """The arguments ``kind``'s builder takes besides the model."""
    return [name for name in declarations(builder_for(kind)) if name != "model"]


def build_graph(kind: str, model: Any, **args: Any) -> TrainingGraph:
    """Build a graph of ``kind``; its arguments are checked once, against the builder's
    declaration (:func:`~collabsurgery.common.arguments.check_arguments`): an unknown name or a
    bad value is a one-line ArgumentError naming the argument and what is valid."""
    builder = builder_for(kind)
    if "split" in args and "split" not in declarations(builder):
        raise UserError(f"pattern '{kind}' takes no split points (each head is a whole model); "
                        f"valid arguments: {', '.join(builder_arguments(kind))}")
    return builder(model, **check_arguments(builder, args, f"pattern '{kind}'", skip=("model",)))


def rebuild(config: GraphConfig) -> TrainingGraph:
    """The graph ``config`` describes, freshly initialised."""
    args = dict(config.args)
    return build_graph(config.kind, args.pop("model"), **args)
