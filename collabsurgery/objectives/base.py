"""The objective contract: an ``nn.Module`` that maps a training graph's output to one loss.

``objective(out, labels, step, graph, temporal_mean) -> LossOutput`` where ``out`` is the graph's
:class:`~collabsurgery.graphs.GraphOutput` (or just its logits ``[H, B, C]``), ``labels`` is
``[B]`` (every head sees the same examples) or ``[H, B]`` (per-head subsets) integer labels, or
soft targets (class probabilities, from mixup, cutmix or label smoothing): float ``[B, C]`` or
``[H, B, C]``; ``step`` says where training is (ramp-ups, random choices), ``graph`` is the
graph itself (for objectives that run heads again on other inputs) and ``temporal_mean`` the
EMA of the graph's weights for an objective that ``wants_temporal_mean``. A subclass implements
:meth:`Objective.head_losses`; the base checks shapes and computes it in float32 with autocast
off, with labels ``[H, B]`` or soft targets ``[H, B, C]``.

Soft targets: every label term takes them (:func:`cross_entropy_per_head` takes both kinds;
a one-hot target gives the hard label's loss). An objective with a label term that has no
soft form says so in ``soft_target_problem()``; ``forward`` then refuses soft targets.

The hook protocol, the one way an objective tells the engine what it needs. Every hook has a
default that asks for nothing.

Declarations (class attributes; ``wants`` and ``wants_holdout`` may be set per instance):

- ``min_heads``: the fewest heads it trains; ``check_compatible`` and ``forward`` enforce it.
- ``wants``: the named graph features it reads (``"input"``, a split point, ``"local:<point>"``):
  the engine runs ``graph.run(x, wants)`` and they arrive in ``context.features``.
- ``own_examples``: heads may train on different examples (labels ``[H, B]``, recipe key
  ``data.subsets``); without it the engine refuses per-head subsets.
- ``needs_teacher``: the constructor takes a ``teacher`` module, which the engine loads from the
  recipe's TEACHER_KEYS. Hold it outside the module tree (in a tuple): never trained,
  checkpointed or exported.
- ``wants_holdout``: ``end_epoch`` gets every head's hold-out logits after each epoch.
- ``default_export``: the head an export takes unless told: "best" (on hold-out) or "last".
- ``soft_target_problem()``: None when every label term takes soft targets, else why not (a
  phrase naming the setting): the engine refuses mixup, cutmix and label smoothing with it.
- ``wants_temporal_mean``: it distils from the temporal mean of the graph's weights (PCL's
  peer mean teachers): the engine refuses a recipe without ``train.ema_decay`` and
  ``train.ema_select`` (:func:`collabsurgery.train.ema.check_temporal_mean`) and passes the EMA
  (timm's ``ModelEmaV3.module``, a copy of the graph in eval mode, updated after every optimizer
  step) as ``context.temporal_mean``. The objective runs it under ``no_grad``; it is never
  trained through the loss, and it is checkpointed and exported by the engine's EMA, not here.
- ``wants_views``: every head trains on its own augmentation of the same images: the engine
  refuses a recipe without ``data.views=per_head``.
- ``graph_defaults``: graph builder arguments the method's authors train with (ONE and OKDDip:
  ``rescale: none``), applied by a recipe whose graph section leaves them out and whose
  pattern takes them; a recipe's own value always wins.

Methods, in the order the engine calls them:

1. ``check_compatible(num_heads, num_classes)``: before training; UserError if unsuited.
2. ``attach(graph)``: once, before the optimizer exists: build the owned modules sized by the
   graph (keeping existing ones of the right size, so a checkpoint loads after a re-attach) and
   set ``wants``; UserError when the graph does not suit it. It never changes the graph.
3. ``head_losses(logits, labels, context)``: every step.
4. ``end_epoch(holdout_logits, holdout_labels)``: with ``wants_holdout``, after each epoch and
   before the checkpoint is written.
5. ``head_roles(num_heads)``: what each head is to the method, for reports.

Owned modules (a gate, attention, auxiliary heads) are submodules: optimised, synced and
checkpointed with the graph, never exported (an export holds only ``graph.head_state_dict(h)``).
Every owned parameter gets a gradient in every step: build only what the arguments switch on,
since distributed training waits for each parameter's gradient. State that must survive a resume
lives in parameters or buffers (updated in ``end_epoch`` or in a step), never in plain attributes.

Random choices (sub-groups, ...) come from ``step.generator(key)``, drawn in one method of the
objective (CGL's ``draw_subgroups(num_heads, step)``): seeded by (seed, epoch, optimizer step),
never by the process rank or the global RNG, so every process draws the same and a resumed run
replays them.

Arguments: the constructor declares each one once, in its signature, with its type, range and
description (``temperature: Temperature = 3.0``, ``target: Literal[...]``; the shared types are
declared below). Every construction checks its arguments against that declaration
(``Objective.__init_subclass__``), and recipes check their objective section's keys with it; the
constructor checks only what relates several arguments, ``attach`` what needs the graph.

Registration (:mod:`.registry`): ``@register_objective(name, example=ObjectiveExample(...))``
above the class; ``tests/test_objective_contract.py`` then checks the objective on the graph
kinds its example names (finite loss, a gradient to every parameter, state round trip, resume,
no objective module in an export).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from collabsurgery.common.arguments import check_arguments
from collabsurgery.common.seeding import generator
from collabsurgery.errors import UserError
from collabsurgery.graphs.base import GraphOutput, TrainingGraph

#: the recipe keys that describe a teacher, for an objective with ``needs_teacher``: the engine
#: loads the model (:func:`collabsurgery.export.teacher.load_teacher`) and passes it as ``teacher``
TEACHER_KEYS = ("teacher", "teacher_head", "teacher_weights", "teacher_kwargs")

# Argument types shared by several objectives' declarations (ranges here, descriptions per use).
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Unit = Annotated[float, Field(ge=0, le=1)]
Temperature = Annotated[Positive, Field(description="softmax temperature T of the soft terms")]
RampupEpochs = Annotated[NonNegative, Field(
    description="epochs over which the KL weight rises (sigmoid ramp-up); 0: full from the start")]


@dataclass(frozen=True)
class Step:
    """Where training is: ``batch`` of epoch ``epoch`` (both from 0) out of ``epochs`` epochs
    of ``batches`` batches each, in a run seeded by ``seed``; ``accumulate`` batches make one
    optimizer step (gradient accumulation)."""

    seed: int = 0
    epoch: int = 0
    batch: int = 0
    epochs: int = 1
    batches: int = 1
    accumulate: int = 1

    @property
    def epochs_done(self) -> float:
        """Epochs done before this optimizer step, fractional (for ramp-ups): counted in optimizer
        steps, so N processes and one process accumulating N batches agree."""
        steps = max(self.batches // self.accumulate, 1)
        return self.epoch + min(self.batch // self.accumulate, steps) / steps

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (for ramp-ups)."""
        return min(1.0, self.epochs_done / max(self.epochs, 1))

    def generator(self, *key: Any) -> torch.Generator:
        """A CPU generator for this optimizer step's random choices: the same on every process
        and for every batch accumulated into the step, so N processes draw what one process
        accumulating N batches draws."""
        return generator("objective", self.seed, self.epoch, self.batch // self.accumulate, *key)


@dataclass
class LossOutput:
    """What an objective returns.

    loss:     scalar to backprop, the SUM over heads of each head's loss (paper 000, eq. (4));
              any 1/H loss scaling is applied by the engine, not here.
    per_head: detached float32 tensor [H], each head's total loss.
    parts:    detached scalars for logging, e.g. {"hard": ..., "soft": ...} (summed over heads).
    """

    loss: Tensor
    per_head: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossContext:
    """What an objective may look at besides logits and labels: the graph's features (the
    names in ``wants``), the step, the graph itself, for objectives that run some heads
    again on other inputs (CGL's sub-group imitation: ``graph.run_heads(x, heads)``), and the
    EMA of the graph's weights for one that ``wants_temporal_mean`` (else None)."""

    features: dict[str, Tensor]
    step: Step
    graph: TrainingGraph | None = None
    temporal_mean: TrainingGraph | None = None  # the EMA of the graph (wants_temporal_mean)


class Objective(nn.Module):
    """Base class: checks shapes, turns autocast off and computes in float32.

    Subclasses implement :meth:`head_losses`, which gets float32 logits ``[H, B, C]``, labels
    ``[H, B]`` (integer) or soft targets ``[H, B, C]`` (float32) and a :class:`LossContext`,
    and returns ``(per_head_losses [H], parts)`` where ``parts`` maps names to per-head tensors
    ``[H]``. What else an objective may declare or implement is the hook protocol of this
    module's docstring; nothing else is read.
    """

    min_heads: int = 1           # the fewest heads it trains
    wants: tuple[str, ...] = ()  # the named graph features it reads (may be set by attach)
    wants_holdout: bool = False  # end_epoch gets every head's hold-out logits
    default_export: str = "best"  # the head export takes unless told: "best" (on hold-out), "last"
    own_examples: bool = False   # heads may train on different examples (data.subsets)
    needs_teacher: bool = False  # takes a ``teacher`` module, loaded from TEACHER_KEYS
    wants_temporal_mean: bool = False  # distils from the EMA of the graph (context.temporal_mean)
    wants_views: bool = False    # each head its own augmentation (data.views=per_head)
    graph_defaults: dict[str, Any] = {}  # the method's graph arguments (read-only)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A constructor a subclass defines checks its arguments against its own annotated
        signature (:func:`_checked_init`): the declaration is the one check of every value."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_init(cls, cls.__dict__["__init__"])  # type: ignore[method-assign]

    def forward(self, out: GraphOutput | Tensor, labels: Tensor, step: Step | None = None,
                graph: TrainingGraph | None = None,
                temporal_mean: TrainingGraph | None = None) -> LossOutput:
        """The loss of ``out`` (a GraphOutput or logits ``[H, B, C]``) against integer labels
        ``[B]`` / ``[H, B]`` or float soft targets ``[B, C]`` / ``[H, B, C]``; UserError for a
        shape that does not fit, or soft targets where :meth:`soft_target_problem` says no.
        ``temporal_mean``: the EMA of ``graph`` (see ``wants_temporal_mean``)."""
        if isinstance(out, Tensor):
            out = GraphOutput(out)
        logits = out.logits
        if logits.dim() != 3:
            raise UserError(f"logits must be [H, B, C], got shape {tuple(logits.shape)}")
        h, b, c = logits.shape
        soft = labels.is_floating_point()
        if soft and labels.shape not in ((b, c), (h, b, c)):
            raise UserError(f"soft targets must be [B, C] or [H, B, C] with H={h}, B={b}, C={c}, "
                            f"got shape {tuple(labels.shape)}")
        if not soft and labels.shape not in ((b,), (h, b)):
            raise UserError(f"labels must be [B] or [H, B] with H={h}, B={b}, got shape "
                            f"{tuple(labels.shape)}")
        if h < self.min_heads:
            raise UserError(f"{type(self).__name__} needs at least {self.min_heads} heads, got {h}")
        problem = self.soft_target_problem() if soft else None
        if problem is not None:
            raise UserError(f"{type(self).__name__} takes no soft targets (mixup, cutmix, label "
                            f"smoothing): {problem}")
        context = LossContext(out.features, step or Step(), graph, temporal_mean)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            targets = labels.float().expand(h, b, c) if soft else labels.expand(h, b)
            per_head, parts = self.head_losses(logits.float(), targets, context)
        return LossOutput(
            loss=per_head.sum(),
            per_head=per_head.detach(),
            parts={k: v.detach().sum() for k, v in parts.items()},
        )

    def check_compatible(self, num_heads: int, num_classes: int) -> None:
        """UserError when this objective cannot train a graph of ``num_heads`` heads predicting
        ``num_classes`` classes (the engine calls it before training starts)."""
        if num_heads < self.min_heads:
            raise UserError(f"{type(self).__name__} needs at least {self.min_heads} heads, "
                            f"got {num_heads}")

    def soft_target_problem(self) -> str | None:
        """None when the objective takes soft targets (mixup, cutmix, label smoothing), else a
        one-line reason naming the setting that cannot and the settings that can; the engine
        refuses soft targets with it at setup and ``forward`` refuses them."""
        return None

    def attach(self, graph: TrainingGraph) -> None:
        """Called once by the engine (and by users of the API) before the optimizer is made:
        an objective whose modules depend on the graph (a gate sized by the trunk's channels)
        builds them here and may set ``wants``; UserError if the graph does not suit it."""

    def head_roles(self, num_heads: int) -> list[str]:
        """What each head is to the method, for reports ("" when all heads are alike)."""
        return [""] * num_heads

    def end_epoch(self, holdout_logits: Tensor, holdout_labels: Tensor) -> None:
        """With ``wants_holdout``: called after every epoch with every head's eval-mode logits
        ``[H, N, C]`` and labels ``[N]`` of the whole hold-out split (the same on every process),
        before the checkpoint is written, so state updated here (buffers) is checkpointed."""

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


def _checked_init(cls: type, init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (``cls``'s own constructor) checking its arguments first, positional ones
    included, against its annotated signature with
    :func:`~collabsurgery.common.arguments.check_arguments`: a bad value or an unknown name is
    a one-line ArgumentError naming the argument, and ``init`` gets the checked values
    (``5e-4`` strings as floats). A call Python itself refuses (too many positional arguments,
    one given twice) goes to ``init`` unchanged, for Python's TypeError."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in inspect.signature(init).parameters.values()
                  if p.kind in kinds][1:]  # without self

    @functools.wraps(init)
    def checked(self: Objective, *args: Any, **kwargs: Any) -> None:
        given = dict(zip(positional, args))
        if len(args) > len(positional) or given.keys() & kwargs.keys():
            return init(self, *args, **kwargs)
        init(self, **check_arguments(cls, {**given, **kwargs}, cls.__name__))

    return checked


def cross_entropy_per_head(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean-over-batch CE of every head: ``[H, B, C]`` -> ``[H]``, against integer labels ``[B]``
    or ``[H, B]``, or soft targets ``t`` ``[B, C]`` or ``[H, B, C]`` (float probabilities:
    ``-sum_c t_c log softmax(z)_c``). ``label_smoothing`` eps smooths either kind of target to
    ``(1 - eps) t + eps / C``."""
    h, b, c = logits.shape
    soft = labels.is_floating_point()
    ce = nn.functional.cross_entropy(
        logits.reshape(h * b, c),
        labels.expand(h, b, c).reshape(h * b, c) if soft else labels.expand(h, b).reshape(h * b),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return ce.view(h, b).mean(1)


def soft_cross_entropy(target: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_b( -sum_c target[b, c] * log softmax(z[b] / T)_c )`` per head, ``[H]``.

    ``target`` (probabilities, ``[H, B, C]``) is used as given: detach it where the method
    says so. Against a fixed target this differs from ``KL(target || p)`` only by the target's
    entropy, a constant, so the gradients are the KL's.
    """
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    return -(target * log_p).sum(-1).mean(-1) * temperature**2


def kl_per_head(target: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(target || softmax(z / T))``, batchmean, per head ``[H]`` (target as given)."""
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    kl = (target * (target.clamp_min(1e-30).log() - log_p)).sum(-1)
    return kl.mean(-1) * temperature**2


def sigmoid_rampup(t: float, length: float) -> float:
    """``exp(-5 (1 - min(1, t / length))^2)``: 0.0067 at ``t = 0``, 1 from ``t = length`` on
    (1 throughout when ``length`` is 0), the ramp-up of the KL terms in
    ONE's and OKDDip's reference code and of CGL (paper 002)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(1.0, max(0.0, t) / length)
    return math.exp(-5.0 * phase * phase)


@torch.no_grad()
def probe(graph: TrainingGraph, wants: tuple[str, ...]) -> GraphOutput:
    """``graph``'s eval-mode output with the features in ``wants`` on two fixed random images
    (the global RNG untouched): what an objective's :meth:`~Objective.attach` reads to size its
    modules and check the graph suits it."""
    device = next(graph.parameters(), torch.zeros(0)).device
    images = torch.randn(2, *graph.input_size, generator=torch.Generator().manual_seed(0))
    training = graph.training
    graph.eval()
    try:
        return graph.run(images.to(device), wants=wants)
    finally:
        graph.train(training)


def require_shared_batch(labels: Tensor, method: str) -> None:
    """UserError unless every head sees the same examples (labels ``[H, B]`` or soft targets
    ``[H, B, C]`` all equal rows): ``method`` combines the heads' outputs example by example."""
    if labels.stride(0) != 0 and not torch.equal(labels, labels[:1].expand_as(labels)):
        raise UserError(f"{method} combines the heads' outputs on each example, so every head "
                        "must see the same examples; got different labels per head")
