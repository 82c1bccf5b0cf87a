"""The objective contract: an ``nn.Module`` that maps every head's logits to one loss.

``objective(logits, labels) -> LossOutput`` with ``logits: Tensor[H, B, C]`` (head 0 first) and
``labels: LongTensor[B]``. Objectives see only logits; anything else they need (a gate, a
ramp-up) they own themselves, which is why they are modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from collabsurgery.errors import UserError


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


class Objective(nn.Module):
    """Base class: checks shapes, turns autocast off and computes in float32.

    Subclasses implement :meth:`head_losses`, which gets float32 logits ``[H, B, C]`` and returns
    ``(per_head_losses [H], parts)`` where ``parts`` maps names to per-head tensors ``[H]``.
    """

    min_heads: int = 1

    def forward(self, logits: Tensor, labels: Tensor) -> LossOutput:
        if logits.dim() != 3:
            raise UserError(f"logits must be [H, B, C], got shape {tuple(logits.shape)}")
        if labels.dim() != 1 or labels.shape[0] != logits.shape[1]:
            raise UserError(
                f"labels must be [B] with B={logits.shape[1]}, got shape {tuple(labels.shape)}"
            )
        if logits.shape[0] < self.min_heads:
            raise UserError(
                f"{type(self).__name__} needs at least {self.min_heads} heads, "
                f"got {logits.shape[0]}"
            )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            per_head, parts = self.head_losses(logits.float(), labels)
        return LossOutput(
            loss=per_head.sum(),
            per_head=per_head.detach(),
            parts={k: v.detach().sum() for k, v in parts.items()},
        )

    def head_losses(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


def cross_entropy_per_head(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean-over-batch CE of every head: ``[H, B, C], [B] -> [H]``."""
    h, b, c = logits.shape
    ce = nn.functional.cross_entropy(
        logits.reshape(h * b, c),
        labels.repeat(h),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return ce.view(h, b).mean(1)
