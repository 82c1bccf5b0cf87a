"""Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from collabsurgery.objectives.base import (LossContext, Objective, Temperature,
                                           cross_entropy_per_head, kl_per_head)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


@register_objective("dml", example=ObjectiveExample())
class MutualLoss(Objective):
    """Every student learns from the labels and from each of the other students.

    For K >= 2 students with logits z_k (B examples)::

        p_j  = softmax(z_j / T)                                        # detached: the target
        L_k  = CE(y, z_k) + T^2 / (K-1) * sum_{j != k} KL(p_j || softmax(z_k / T))
        KL   = (1/B) sum_b sum_i p_j[b, i] * (log p_j[b, i] - log softmax(z_k[b] / T)_i)
        L    = sum_k L_k

    All logits come from ONE forward and every student is updated in the same step (the
    paper alternates per-student updates; a simultaneous update is its usual implementation).
    The paper uses T=1; T^2 keeps the mimicry gradient's scale independent of T.
    """

    min_heads = 2

    def __init__(self, temperature: Temperature = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        t, k = self.temperature, logits.shape[0]
        with torch.no_grad():
            p = torch.softmax(logits / t, dim=-1)  # [K, B, C]
        # kl[j, k] = T^2 KL(p_j || p_k); the diagonal is masked out, not subtracted
        kl = torch.stack([kl_per_head(p[j].expand_as(p), logits, t) for j in range(k)])
        others = 1.0 - torch.eye(k, device=logits.device, dtype=logits.dtype)
        mimicry = (kl * others).sum(0) / (k - 1)
        hard = cross_entropy_per_head(logits, labels)
        return hard + mimicry, {"hard": hard, "mimicry": mimicry}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
