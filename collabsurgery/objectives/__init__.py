"""Objectives: losses over a training graph's output (see :mod:`.base` for the contract)."""

from __future__ import annotations

import inspect
from typing import Any

from collabsurgery.errors import UserError
from collabsurgery.objectives.base import TEACHER_KEYS, LossContext, LossOutput, Objective, Step
from collabsurgery.objectives.consensus import ConsensusLoss
from collabsurgery.objectives.distill import DistillationLoss
from collabsurgery.objectives.ensemble import EnsembleTargetLoss
from collabsurgery.objectives.group import GroupImitationLoss
from collabsurgery.objectives.intra import IntraModelLoss
from collabsurgery.objectives.mutual import MutualLoss
from collabsurgery.objectives.native_ensemble import NativeEnsembleLoss
from collabsurgery.objectives.peer_attention import PeerAttentionLoss
from collabsurgery.objectives.single import LabelSmoothingLoss, SingleLoss

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str, cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` buildable by ``name``; a name registered twice is an error."""
    if name in OBJECTIVES:
        raise ValueError(f"objective '{name}' is already registered")
    OBJECTIVES[name] = cls
    return cls


for _name, _cls in (("consensus", ConsensusLoss), ("single", SingleLoss),
                    ("label_smoothing", LabelSmoothingLoss), ("dml", MutualLoss),
                    ("kd", DistillationLoss), ("kdcl", EnsembleTargetLoss),
                    ("one", NativeEnsembleLoss), ("okddip", PeerAttentionLoss),
                    ("cgl", GroupImitationLoss), ("intra", IntraModelLoss)):
    register_objective(_name, _cls)


def objective_arguments(name: str) -> list[str]:
    """The recipe keys of objective ``name``: its constructor arguments, with a teacher's keys
    (TEACHER_KEYS) for one that ``needs_teacher``; UserError for an unknown name."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    valid = list(inspect.signature(OBJECTIVES[name]).parameters)
    if OBJECTIVES[name].needs_teacher:
        valid += [key for key in TEACHER_KEYS if key not in valid]
    return valid


def check_objective_arguments(name: str, args: dict[str, Any]) -> None:
    """UserError naming an argument that objective ``name`` does not take."""
    valid = list(inspect.signature(OBJECTIVES[name]).parameters) if name in OBJECTIVES \
        else objective_arguments(name)
    for key in args:
        if key not in valid:
            raise UserError(f"objective '{name}' takes no argument '{key}'; valid: "
                            f"{', '.join(valid) or 'none'}")


def build_objective(name: str, **kwargs: Any) -> Objective:
    """Build an objective by name; an unknown name or keyword is a UserError."""
    check_objective_arguments(name, kwargs)
    try:
        inspect.signature(OBJECTIVES[name]).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"bad arguments for objective {name!r}: {e}") from None
    return OBJECTIVES[name](**kwargs)


__all__ = [
    "OBJECTIVES",
    "TEACHER_KEYS",
    "ConsensusLoss",
    "DistillationLoss",
    "EnsembleTargetLoss",
    "GroupImitationLoss",
    "IntraModelLoss",
    "LabelSmoothingLoss",
    "LossContext",
    "LossOutput",
    "MutualLoss",
    "NativeEnsembleLoss",
    "Objective",
    "PeerAttentionLoss",
    "SingleLoss",
    "Step",
    "build_objective",
    "check_objective_arguments",
    "objective_arguments",
    "register_objective",
]
