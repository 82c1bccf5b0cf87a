"""Loss functions that see only logits ``[H, B, C]`` and labels ``[B]``."""

from __future__ import annotations

import inspect
from typing import Any

from collabsurgery.errors import UserError
from collabsurgery.objectives.base import LossOutput, Objective
from collabsurgery.objectives.consensus import ConsensusLoss
from collabsurgery.objectives.single import LabelSmoothingLoss, SingleLoss

OBJECTIVES: dict[str, type[Objective]] = {
    "consensus": ConsensusLoss,
    "single": SingleLoss,
    "label_smoothing": LabelSmoothingLoss,
}


def build_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by name; an unknown name or keyword is a UserError."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"bad arguments for objective {name!r}: {e}") from None
    return cls(**kwargs)


__all__ = [
    "OBJECTIVES",
    "ConsensusLoss",
    "LabelSmoothingLoss",
    "LossOutput",
    "Objective",
    "SingleLoss",
    "build_objective",
]
