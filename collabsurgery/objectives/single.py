"""Objectives without collaboration: every head learns from the labels alone."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import Tensor

from collabsurgery.objectives.base import LossContext, Objective, cross_entropy_per_head
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


@register_objective("single", example=ObjectiveExample(data="subsets"))
class SingleLoss(Objective):
    """Plain cross entropy per head, summed: ``L = sum_h CE(y, z_h)``.

    H=1 is the single-model baseline; H>1 is independent training with no collaboration,
    so heads may each train on their own examples (``data.subsets``).
    """

    own_examples = True

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        hard = cross_entropy_per_head(logits, labels)
        return hard, {"hard": hard}


@register_objective("label_smoothing", example=ObjectiveExample(data="subsets"))
class LabelSmoothingLoss(Objective):
    """Cross entropy with label smoothing per head, summed.

    ``L = sum_h CE((1 - eps) * onehot(y) + eps / C, z_h)``, as
    ``F.cross_entropy(..., label_smoothing=eps)``. Soft targets t (mixup, cutmix) are smoothed
    the same way, to ``(1 - eps) t + eps / C``; on top of any smoothing the engine applied.
    """

    own_examples = True

    def __init__(self, smoothing: Annotated[float, Field(
            ge=0, lt=1, description="eps: the target is (1 - eps) onehot(y) + eps / C")] = 0.1
                 ) -> None:
        super().__init__()
        self.smoothing = smoothing

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        hard = cross_entropy_per_head(logits, labels, label_smoothing=self.smoothing)
        return hard, {"hard": hard}

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"
