"""Accuracy and loss of every head and of the ensemble of heads on one data split."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: DataLoader, accelerator: Accelerator,
             outputs: list | None = None) -> dict:
    """Per-head accuracy/loss, the ensemble's (mean of the heads' logits) and, with several heads,
    their diversity (paper 002: the mean over examples and head pairs of the L2 distance between
    the heads' probability vectors), in eval mode.

    Counts are gathered over all processes (``gather_for_metrics`` drops the padding that
    even sharding adds), so every rank returns the same numbers. When ``outputs`` is a list,
    it receives every head's logits ``[H, N, C]`` (float32) and the labels ``[N]`` of the whole
    split, the same on every rank.
    """
    was_training = net.training
    net.eval()
    correct = loss_sum = ensemble_correct = distance_sum = None
    total = 0
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images, labels in loader:
        with accelerator.autocast():
            logits = net(images)
        # Gather batch-first: gather_for_metrics concatenates (and trims) along dim 0.
        per_example, labels = accelerator.gather_for_metrics((logits.float().transpose(0, 1), labels))
        logits = per_example.transpose(0, 1)
        if outputs is not None:
            kept.append((logits, labels))
        heads = logits.shape[0]
        if correct is None:
            correct = torch.zeros(heads, dtype=torch.long, device=logits.device)
            loss_sum = torch.zeros(heads, dtype=torch.float64, device=logits.device)
            ensemble_correct = torch.zeros((), dtype=torch.long, device=logits.device)
            distance_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        correct += (logits.argmax(-1) == labels).sum(-1)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), labels.repeat(heads),
                                    reduction="none").view(heads, -1).sum(-1).double()
        ensemble_correct += (logits.mean(0).argmax(-1) == labels).sum()
        distance_sum += pairwise_distance_sum(logits)
        total += labels.numel()
    net.train(was_training)
    if outputs is not None:
        outputs += [torch.cat([k[0] for k in kept], 1), torch.cat([k[1] for k in kept])]
    head_acc = (correct.double() / total).tolist()
    best = max(range(len(head_acc)), key=head_acc.__getitem__)
    record = {
        "head_acc": head_acc,
        "head_loss": (loss_sum / total).tolist(),
        "ensemble_acc": ensemble_correct.item() / total,
        "best_head": best,
        "examples": total,
    }
    heads = len(head_acc)
    if heads > 1:
        record["diversity"] = distance_sum.item() / (total * heads * (heads - 1) / 2)
    return record


def pairwise_distance_sum(logits: torch.Tensor) -> torch.Tensor:
    """Sum over examples and head pairs ``i < j`` of ``||softmax(z_i) - softmax(z_j)||_2``
    (float64): paper 002's diversity of students, before the mean."""
    p = logits.float().softmax(-1).transpose(0, 1)          # [N, H, C]
    distances = torch.cdist(p.double(), p.double())         # [N, H, H]
    return distances.triu(diagonal=1).sum()
