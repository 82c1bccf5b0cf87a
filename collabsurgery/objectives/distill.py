"""Offline knowledge distillation from a frozen teacher (Hinton, Vinyals & Dean, 2015).

The teacher arrives as a module: a recipe's ``objective.teacher`` (an export, a run directory,
or a model name with ``teacher_weights``) is loaded by the engine through
:func:`collabsurgery.export.teacher.load_teacher` before this objective is built.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from collabsurgery.errors import UserError
from collabsurgery.models import backbones
from collabsurgery.objectives.base import (LossContext, Objective, Temperature, Unit,
                                           cross_entropy_per_head, kl_per_head)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


def _num_classes(model: nn.Module) -> int | None:
    """A classifier's class count: timm's ``num_classes``, else a probe forward; None if the
    probe fails (the loss then checks the teacher's output on the first batch)."""
    known = getattr(model, "num_classes", None)
    if isinstance(known, int) and not isinstance(known, bool) and known > 0:
        return known
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *backbones.default_input_size(model), device=device))
    except Exception:  # noqa: BLE001 - e.g. a fixed input size we cannot guess
        return None
    return out.shape[-1] if isinstance(out, Tensor) and out.dim() == 2 else None


@register_objective("kd", example=ObjectiveExample())
class DistillationLoss(Objective):
    """Every head learns from the labels and from a frozen teacher.

    For head h with logits z_h, teacher logits t on the same input (B examples)::

        L_h = alpha * T^2 * KL(softmax(t / T) || softmax(z_h / T)) + (1 - alpha) * CE(y, z_h)
        KL  = (1/B) sum_b sum_i q[b, i] * (log q[b, i] - log softmax(z_h[b] / T)_i)   # batchmean
        L   = sum_h L_h

    Hinton et al. leave T and the weighting open; the defaults T=4, alpha=0.9 are the CIFAR-100
    KD baseline of Tian et al., "Contrastive Representation Distillation" (ICLR 2020; their
    RepDistiller code: kd_T=4, 0.9 on the KL term, 0.1 on CE).

    The teacher runs under ``torch.no_grad`` on the graph's ``"input"``: once for a shared
    batch (a stride-0 view over heads), on every head's own batch otherwise. It is held in a
    tuple, so it is no submodule: not in ``state_dict()`` or ``parameters()``, never
    checkpointed, exported, synced or optimised; it stays in eval mode and follows the logits
    to their device on first use.
    """

    wants = ("input",)

    needs_teacher = True

    def __init__(
            self, teacher: Annotated[nn.Module, Field(
                description="the frozen teacher model (a recipe's teacher keys are loaded into "
                            "one by collabsurgery.export.teacher.load_teacher)")],
            temperature: Temperature = 4.0,
            alpha: Annotated[Unit, Field(
                description="weight of the KL term; 1 - alpha on the labels' CE")] = 0.9) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha
        #: where the teacher came from, for messages (the engine sets the recipe's value)
        self.teacher_source = type(teacher).__name__
        self._teacher = (teacher.eval().requires_grad_(False),)
        self._teacher_classes: int | None = None
        self._probed = False

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule)."""
        return self._teacher[0]

    def train(self, mode: bool = True) -> "DistillationLoss":
        """Set the objective's own modules to ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def check_compatible(self, num_heads: int, num_classes: int) -> None:
        """Also a UserError when the teacher predicts another number of classes."""
        super().check_compatible(num_heads, num_classes)
        if not self._probed:  # the engine's check and every forward's: probe only once
            self._teacher_classes, self._probed = _num_classes(self.teacher), True
        if self._teacher_classes not in (None, num_classes):
            raise UserError(f"teacher {self.teacher_source} predicts {self._teacher_classes} "
                            f"classes but the students predict {num_classes}; valid: a teacher "
                            "trained on the same classes")

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """Teacher logits ``[H, B, C]`` for a graph input ``[H, B, ...]``, float32."""
        teacher = self.teacher
        param = next(teacher.parameters(), None)
        if param is not None and param.device != x.device:
            teacher.to(x.device)
        h, b = x.shape[:2]
        if x.stride(0) == 0:  # the same batch for every head: run the teacher once
            return teacher(x[0].float()).float().expand(h, b, -1)
        return teacher(x.flatten(0, 1).float()).float().view(h, b, -1)

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        t, alpha = self.temperature, self.alpha
        teacher = self.teacher_logits(context.features["input"])
        if teacher.shape[-1] != logits.shape[-1]:
            raise UserError(f"teacher {self.teacher_source} gives {teacher.shape[-1]} classes, "
                            f"the students {logits.shape[-1]}")
        soft = kl_per_head(torch.softmax(teacher / t, dim=-1), logits, t)  # [H], batchmean
        hard = cross_entropy_per_head(logits, labels)
        return alpha * soft + (1.0 - alpha) * hard, {"hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return (f"teacher={self.teacher_source!r}, temperature={self.temperature}, "
                f"alpha={self.alpha}")
