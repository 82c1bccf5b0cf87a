"""Collaborative Group Learning's sub-group imitation (Feng et al., AAAI 2021; paper 002)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.base import INPUT
from collabsurgery.objectives.base import (LossContext, Objective, Step, Temperature, Unit,
                                           cross_entropy_per_head, kl_per_head)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


def group_rampup(step: Step, start: float, end: float) -> float:
    """Paper 002's phi(t): ``exp(-5 (1 - lambda)^2)`` inside the ramp-up range
    ``[start, end]`` (fractions of training), lambda rising linearly from 0 to 1 across it;
    1 outside it (as eq. 6 defines it, also before ``start``)."""
    progress = step.progress
    if end <= start or not start <= progress <= end:
        return 1.0
    lam = (progress - start) / (end - start)
    return math.exp(-5.0 * (1.0 - lam) ** 2)


@register_objective("cgl", example=ObjectiveExample(data="subsets"))
class GroupImitationLoss(Objective):
    """Every student learns from the labels and from a random sub-group of the others.

    Each step, for each student k, every other student j joins k's sub-group with probability
    p, drawn from ``step.generator("subgroup")`` (the same on every process, replayed after a
    resume). The sub-group's logits are computed on STUDENT k's batch, without gradient, for the
    drawn students only (``graph.run_heads``, which reuses the layers they share with student k;
    with a shared batch the step's logits are reused)::

        z_t^k = (1 / H) sum_{j in S_k} z_j(x_k),   H = p (K - 1)      # eq. 5
        L     = sum_k CE(y_k, z_k) + phi(t) KL(softmax(z_t^k / T) || softmax(z_k / T))   # eqs. 4, 6

    The imitation forwards run in the graph's current mode: in training, the imitated students'
    BatchNorm layers normalise with student k's batch statistics and, as any training-mode
    forward does, update their running statistics with it (no gradient flows).
    H is read as the EXPECTED sub-group size ("the expected number of imitated students"), not
    the drawn size, so z_t is a sum of the drawn logits scaled by a constant. An empty sub-group
    gives student k no KL term in that step. The KL is batch-mean and, as in eq. 4, not scaled by
    T^2. phi(t) is :func:`group_rampup` over ``rampup`` (fractions of training; the paper's
    best is the first 20%). Paper 002 gives no temperature; T = 3 is ONE's and OKDDip's.
    Heads may train on their own examples (``data.subsets``: paper 002's sub-set data).
    parts: "hard" = CE, "soft" = KL (before phi), "imitated" = |S_k|.
    """

    min_heads = 2
    wants = (INPUT,)
    own_examples = True

    def __init__(
            self, probability: Annotated[float, Field(
                gt=0, le=1, description="p: the chance that each other student joins a "
                                        "student's sub-group in a step")] = 0.25,
            temperature: Temperature = 3.0,
            rampup: Annotated[Sequence[Unit], Field(
                min_length=2, max_length=2, description="[start, end] of the KL ramp-up, "
                                                        "fractions of training")] = (0.0, 0.2)
            ) -> None:
        super().__init__()
        start, end = rampup
        if end < start:
            raise ArgumentError("rampup", f"must be [start, end] with start <= end, got {rampup!r}")
        self.probability, self.temperature, self.rampup = probability, temperature, (start, end)

    def draw_subgroups(self, num_heads: int, step: Step) -> Tensor:
        """``[K, K]`` bool: row k marks the students imitated by k this step (never k itself)."""
        draw = torch.rand(num_heads, num_heads, generator=step.generator("subgroup"))
        return (draw < self.probability) & ~torch.eye(num_heads, dtype=torch.bool)

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        k_n = logits.shape[0]
        groups = self.draw_subgroups(k_n, context.step)
        x = context.features[INPUT]
        shared = x.stride(0) == 0  # one batch for every head: the step's logits are z_j(x_k)
        if not shared and context.graph is None:
            raise UserError("sub-group imitation on per-student batches runs other students on "
                            "student k's batch: pass the graph (the engine does)")
        expected = self.probability * (k_n - 1)
        targets, imitating = [], []
        with torch.no_grad():
            for k in range(k_n):
                members = groups[k].nonzero().flatten().tolist()
                if not members:
                    targets.append(torch.zeros_like(logits[k]))
                    continue
                z = logits[members] if shared else \
                    context.graph.run_heads(x[k], members, source=k)
                targets.append(z.float().sum(0) / expected)
                imitating.append(k)
        t = self.temperature
        soft = kl_per_head(torch.softmax(torch.stack(targets) / t, dim=-1), logits, t) / t**2
        active = torch.zeros(k_n, dtype=torch.bool, device=logits.device)
        active[imitating] = True
        soft = torch.where(active, soft, torch.zeros_like(soft))
        hard = cross_entropy_per_head(logits, labels)
        phi = group_rampup(context.step, *self.rampup)
        return hard + phi * soft, {"hard": hard, "soft": soft,
                                   "imitated": groups.sum(1).to(logits)}

    def extra_repr(self) -> str:
        return (f"probability={self.probability}, temperature={self.temperature}, "
                f"rampup={self.rampup}")
