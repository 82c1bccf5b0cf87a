"""Objectives: losses over a training graph's output (see :mod:`.base` for the contract).

Each objective's module registers it (:func:`.registry.register_objective`); importing them
here, in this order, is the registration order (consensus, single, label_smoothing, dml, kd,
kdcl, one, okddip, pcl, cgl, intra, byot).
"""

from __future__ import annotations

from collabsurgery.objectives.base import TEACHER_KEYS, LossContext, LossOutput, Objective, Step
from collabsurgery.objectives.registry import (EXAMPLES, OBJECTIVES, ObjectiveExample,
                                               build_objective, check_objective_arguments,
                                               objective_arguments, register_objective)

from collabsurgery.objectives.consensus import ConsensusLoss  # isort: skip
from collabsurgery.objectives.single import LabelSmoothingLoss, SingleLoss  # isort: skip
from collabsurgery.objectives.mutual import MutualLoss  # isort: skip
from collabsurgery.objectives.distill import DistillationLoss  # isort: skip
from collabsurgery.objectives.ensemble import EnsembleTargetLoss  # isort: skip
from collabsurgery.objectives.native_ensemble import NativeEnsembleLoss  # isort: skip
from collabsurgery.objectives.peer_attention import PeerAttentionLoss  # isort: skip
from collabsurgery.objectives.peer_collaborative import PeerCollaborativeLoss  # isort: skip
from collabsurgery.objectives.group import GroupImitationLoss  # isort: skip
from collabsurgery.objectives.intra import IntraModelLoss  # isort: skip
from collabsurgery.objectives.self_distillation import SelfDistillationLoss  # isort: skip

__all__ = [
    "EXAMPLES",
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
    "ObjectiveExample",
    "PeerAttentionLoss",
    "PeerCollaborativeLoss",
    "SelfDistillationLoss",
    "SingleLoss",
    "Step",
    "build_objective",
    "check_objective_arguments",
    "objective_arguments",
    "register_objective",
]
