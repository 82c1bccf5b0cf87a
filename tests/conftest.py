"""Fixtures shared by the tests, and the offline setting; helpers live in ``helpers.py``.

Everything runs on CPU with tiny inputs (32 px, batch 2); no network is ever used.
"""
from __future__ import annotations

import os

# timm and huggingface_hub read this when they are imported: loading weights from a local file
# (``pretrained_cfg_overlay=dict(file=...)``) must never try to reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from collabsurgery.objectives import (EXAMPLES, OBJECTIVES, Objective,  # noqa: E402
                                      ObjectiveExample, register_objective)
from collabsurgery.objectives.base import cross_entropy_per_head  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, unless OMP_NUM_THREADS says otherwise.

    On a small shared CPU machine, two OpenMP threads competing with other processes ran these
    tiny convolutions up to 30x slower than one thread.
    """
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LearntTemperatureCE(Objective):
    """Cross entropy of ``logits / T`` per head, summed; ``T = exp(log_temperature)`` is a
    parameter the objective owns (as gates, attention or auxiliary heads would be: trained,
    checkpointed, never exported)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def head_losses(self, logits, labels, context):
        ce = cross_entropy_per_head(logits / self.log_temperature.exp(), labels)
        return ce, {"hard": ce}


TEST_OBJECTIVE = "test_learnt_temperature"  # recipes select it with objective={name: ...}


@pytest.fixture(scope="session", autouse=True)
def registered_test_objective():
    """LearntTemperatureCE registered as TEST_OBJECTIVE while the tests run, then removed:
    importing conftest changes no registry, and the objective contract, parametrised when
    the tests are collected (before this runs), covers only the library's objectives."""
    register_objective(TEST_OBJECTIVE, example=ObjectiveExample())(LearntTemperatureCE)
    yield TEST_OBJECTIVE
    del OBJECTIVES[TEST_OBJECTIVE], EXAMPLES[TEST_OBJECTIVE]


@pytest.fixture(scope="module")
def forget_accelerate_state():
    """Leave no mixed-precision setting behind in Accelerate's process-wide state after a
    module's tests (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
