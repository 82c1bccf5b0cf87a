"""CL-ILR consensus objective (paper 000, Song & Chai 2018, section 3.2)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from collabsurgery.objectives.base import (LossContext, Objective, Temperature, Unit,
                                           cross_entropy_per_head, soft_cross_entropy)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


@register_objective("consensus", example=ObjectiveExample())
class ConsensusLoss(Objective):
    """Each head learns from the labels and from the consensus of the OTHER heads.

    For head h with logits z_h (H >= 2 heads, B examples)::

        q_h    = softmax( (1/(H-1)) * sum_{j != h} z_j / T )          # detached
        L_h    = beta * CE(y, z_h) + (1 - beta) * T^2 * J_soft(q_h, z_h)
        J_soft = (1/B) sum_b -sum_i q_h[b, i] * log softmax(z_h[b] / T)_i   # batchmean
        L      = sum_h L_h                                            # eq. (4)

    The consensus averages LOGITS, not probabilities; T^2 keeps the soft gradient's scale
    independent of T (Hinton et al.). The mean of the others is ``(sum - z_h) / (H - 1)``.
    """

    min_heads = 2

    def __init__(self, temperature: Temperature = 2.0, beta: Annotated[Unit, Field(
            description="weight of the labels' CE; 1 - beta on the consensus term")] = 0.5
                 ) -> None:
        super().__init__()
        self.temperature, self.beta = temperature, beta

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        t, beta, h = self.temperature, self.beta, logits.shape[0]
        with torch.no_grad():
            others = (logits.sum(0, keepdim=True) - logits) / (h - 1)  # [H, B, C]
            q = torch.softmax(others / t, dim=-1)
        soft = soft_cross_entropy(q, logits, t)  # [H], batchmean
        hard = cross_entropy_per_head(logits, labels)
        total = beta * hard + (1.0 - beta) * soft
        return total, {"hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, beta={self.beta}"
