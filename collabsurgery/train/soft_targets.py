"""Soft targets for a training batch: timm's Mixup / CutMix and label smoothing.

timm's :class:`~timm.data.Mixup` draws its mixing coefficient, its choice between Mixup and
CutMix and the CutMix box from NumPy's global generator. Here that generator is re-seeded from
(seed, epoch, batch) before every batch, so the draws do not depend on the rank or the process
count and a resumed run replays them. Every head's images are mixed with the same draw: for
per-head views (the same examples, each head its own augmentation) the targets stay one
``[B, C]`` for all heads; for per-head subsets (different examples) they are ``[H, B, C]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from collabsurgery.common.seeding import derive_seed
from collabsurgery.errors import UserError


def soft_targets_asked(train: Any) -> bool:
    """Whether ``train`` asks for Mixup, CutMix or label smoothing."""
    return bool(train.mixup or train.cutmix or train.label_smoothing)


class SoftTargets:
    """Mix a batch and turn its labels into soft targets, the same way on every replay."""

    def __init__(self, train: Any, num_classes: int):
        self.num_classes = num_classes
        self.smoothing = train.label_smoothing
        self.mixup = Mixup(
            mixup_alpha=train.mixup, cutmix_alpha=train.cutmix, prob=train.mixup_prob,
            switch_prob=train.mixup_switch_prob, mode="batch",
            label_smoothing=train.label_smoothing, num_classes=num_classes,
        ) if train.mixup or train.cutmix else None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, *key: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, labels)`` of one batch, mixed, with soft targets; ``key`` seeds the draws
        (the run's seed, epoch and batch index)."""
        if self.mixup is None:
            flat = mixup_target(labels.reshape(-1), self.num_classes, smoothing=self.smoothing)
            return x, flat.view(*labels.shape, self.num_classes)
        seed = derive_seed("mixup", *key) % 2**32
        if x.dim() == 4:  # one batch for every head
            np.random.seed(seed)
            return self.mixup(x, labels)
        # [H, B, ...]: each head's images with the same draw (and the same pairs)
        mixed, targets = [], []
        for h in range(x.shape[0]):
            np.random.seed(seed)
            x_h, t_h = self.mixup(x[h].clone(), labels[h] if labels.dim() == 2 else labels)
            mixed.append(x_h)
            targets.append(t_h)
        return torch.stack(mixed), (torch.stack(targets) if labels.dim() == 2 else targets[0])


def check_soft_targets(train: Any, objective: Any, objective_name: str, batch_size: int) -> None:
    """UserError (one line) when the recipe asks for soft targets that cannot be used: an
    objective that needs hard labels, or Mixup/CutMix with an odd batch."""
    if not soft_targets_asked(train):
        return
    asked = ", ".join(f"train.{k}={getattr(train, k)}" for k in ("mixup", "cutmix",
                                                                    "label_smoothing")
                      if getattr(train, k))
    problem = objective.soft_target_problem()
    if problem:
        raise UserError(f"{asked} gives soft targets, but objective '{objective_name}' cannot "
                        f"take them: {problem}")
    if train.label_smoothing and getattr(objective, "smoothing", 0):
        raise UserError(f"train.label_smoothing={train.label_smoothing} and objective "
                        f"'{objective_name}' (smoothing={objective.smoothing}) would smooth the "
                        "labels twice; use objective 'single' with train.label_smoothing, or "
                        "set train.label_smoothing=0")
    if (train.mixup or train.cutmix) and batch_size % 2:
        raise UserError(f"train.batch_size={batch_size} is odd, but timm's Mixup/CutMix pairs "
                        "each example with the batch's mirror image; give an even batch size")
