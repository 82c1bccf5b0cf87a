"""Evaluation of every head: accuracies, losses, the ensemble, and paper 002's diversity, against
a computation by hand on fixed logits, in one batch or split over several."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from collabsurgery.train.evaluate import evaluate


class FixedHeads(torch.nn.Module):
    """``net(x)`` -> the test's logits ``[H, B, C]`` for the examples indexed by ``x``."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[:, index.long()]


@pytest.mark.parametrize("batch", [6, 4, 1])
def test_accuracy_ensemble_and_diversity_match_a_hand_computation(batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 4, generator=g) * 2
    labels = torch.randint(0, 4, (6,), generator=g)
    loader = DataLoader(TensorDataset(torch.arange(6), labels), batch_size=batch)
    record = evaluate(FixedHeads(logits), loader, Accelerator(cpu=True))
    p = logits.softmax(-1).tolist()
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    distance = sum(math.dist(p[i][n], p[j][n]) for n in range(6) for i, j in pairs) / (6 * 3)
    assert record["diversity"] == pytest.approx(distance, rel=1e-6)
    accs = [(logits[h].argmax(-1) == labels).float().mean().item() for h in range(3)]
    assert record["head_acc"] == pytest.approx(accs)
    ensemble = (logits.mean(0).argmax(-1) == labels).float().mean().item()
    assert record["ensemble_acc"] == pytest.approx(ensemble) and record["examples"] == 6
    one = evaluate(FixedHeads(logits[:1]), loader, Accelerator(cpu=True))
    assert "diversity" not in one  # one head: no pairs
