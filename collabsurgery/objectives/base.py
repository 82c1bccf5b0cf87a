"""The objective contract: an ``nn.Module`` that maps a training graph's output to one loss.

``objective(out, labels, step) -> LossOutput`` where ``out`` is the graph's
:class:`~collabsurgery.graphs.GraphOutput` (or just its logits ``[H, B, C]``), ``labels`` is
``[B]`` (every head sees the same examples) or ``[H, B]`` (per-head subsets), and ``step`` says
where training is (for ramp-ups and per-step random choices).

- ``wants``: the named graph features the objective needs (``"input"``, a split point, ...);
  the engine asks the graph for exactly these.
- Random choices (sub-groups, routes, ...) come from ``step.generator(...)``: seeded by
  (seed, epoch, batch) and never by the process rank, so every process draws the same and a
  resumed run replays them.
- An objective may own modules (a gate, attention, auxiliary heads): the engine optimises,
  syncs and checkpoints graph + objective together; an export holds only the graph's head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from collabsurgery.common.seeding import generator
from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.base import GraphOutput, TrainingGraph

#: the recipe keys that describe a teacher, for an objective with ``needs_teacher``: the engine
#: loads the model (:func:`collabsurgery.export.teacher.load_teacher`) and passes it as ``teacher``
TEACHER_KEYS = ("teacher", "teacher_head", "teacher_weights", "teacher_kwargs")


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
    names in ``wants``), the step, and the graph itself, for objectives that run some heads
    again on other inputs (CGL's sub-group imitation: ``graph.run_heads(x, heads)``)."""

    features: dict[str, Tensor]
    step: Step
    graph: TrainingGraph | None = None


class Objective(nn.Module):
    """Base class: checks shapes, turns autocast off and computes in float32.

    Subclasses implement :meth:`head_losses`, which gets float32 logits ``[H, B, C]``, labels
    ``[H, B]`` and a :class:`LossContext`, and returns ``(per_head_losses [H], parts)`` where
    ``parts`` maps names to per-head tensors ``[H]``.
    """

    min_heads: int = 1
    wants: tuple[str, ...] = ()
    wants_holdout: bool = False  # end_epoch gets every head's hold-out logits
    default_export: str = "best"  # the head export takes unless told: "best" (on hold-out), "last"
    own_examples: bool = False   # heads may train on different examples (data.subsets)
    needs_teacher: bool = False  # takes a ``teacher`` module, loaded from TEACHER_KEYS

    def forward(self, out: GraphOutput | Tensor, labels: Tensor, step: Step | None = None,
                graph: TrainingGraph | None = None) -> LossOutput:
        if isinstance(out, Tensor):
            out = GraphOutput(out)
        logits = out.logits
        if logits.dim() != 3:
            raise UserError(f"logits must be [H, B, C], got shape {tuple(logits.shape)}")
        h, b = logits.shape[:2]
        if labels.shape not in ((b,), (h, b)):
            raise UserError(f"labels must be [B] or [H, B] with H={h}, B={b}, got shape "
                            f"{tuple(labels.shape)}")
        if h < self.min_heads:
            raise UserError(f"{type(self).__name__} needs at least {self.min_heads} heads, got {h}")
        context = LossContext(out.features, step or Step(), graph)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            per_head, parts = self.head_losses(logits.float(), labels.expand(h, b), context)
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


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in the interval, else an ArgumentError
    naming ``name`` and the interval (recipes can hold any YAML value, "1" and true included)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value)
            and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high)):
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low:g}"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ArgumentError(name, f"must be a number {interval}, got {value!r}")
    return float(value)


def cross_entropy_per_head(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean-over-batch CE of every head: ``[H, B, C]``, labels ``[B]`` or ``[H, B]`` -> ``[H]``."""
    h, b, c = logits.shape
    ce = nn.functional.cross_entropy(
        logits.reshape(h * b, c),
        labels.expand(h, b).reshape(h * b),
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
    """UserError unless every head sees the same examples (labels ``[H, B]`` all equal rows):
    ``method`` combines the heads' outputs example by example."""
    if labels.stride(0) != 0 and not torch.equal(labels, labels[:1].expand_as(labels)):
        raise UserError(f"{method} combines the heads' outputs on each example, so every head "
                        "must see the same examples; got different labels per head")
