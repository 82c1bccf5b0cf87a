"""ONE: On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from collabsurgery.errors import UserError
from collabsurgery.graphs.base import TrainingGraph
from collabsurgery.objectives.base import (LossContext, Objective, RampupEpochs, Temperature,
                                           cross_entropy_per_head, kl_per_head, probe,
                                           require_shared_batch, sigmoid_rampup)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


def make_gate(channels: int, branches: int) -> nn.Sequential:
    """ONE's gate: a trunk feature ``[B, C, h, w]`` (any h, w) -> branch weights ``[B, K]``
    (rows >= 0 summing to 1): average pool, ``Linear(C, K)``, ``BatchNorm1d(K)``, ReLU,
    softmax over the branches."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, branches),
                         nn.BatchNorm1d(branches), nn.ReLU(), nn.Softmax(dim=1))


@register_objective("one", example=ObjectiveExample(kinds=("tree",)))
class NativeEnsembleLoss(Objective):
    """K branches on a shared trunk learn from the labels and from their gated ensemble.

    With branch logits z_k (B examples), labels y and the trunk feature x::

        g    = softmax(relu(bn(W avgpool(x))))           # the gate, [B, K], rows sum to 1
        z_e  = sum_k g[:, k] * z_k                       # the native ensemble teacher, [B, C]
        p_e  = softmax(z_e / T)                          # DETACHED
        KL_k = (1/B) sum_b sum_i p_e[b, i] (log p_e[b, i] - log softmax(z_k[b] / T)_i)
        L    = sum_k CE(y, z_k) + CE(y, z_e) + w(t) T^2 sum_k KL_k
        w(t) = exp(-5 (1 - min(1, t / R))^2),  t = epochs done (Step.epochs_done)

    Head k's loss is ``CE(y, z_k) + CE(y, z_e) / K + w(t) T^2 KL_k`` so the heads sum to L.
    Gradients: CE(y, z_k) trains branch k and the trunk; CE(y, z_e) trains every branch, the
    trunk and the gate; the KL trains only branch k (and the trunk through it): its teacher
    p_e is detached, so it never moves the gate or the other branches.
    Defaults: T = 3 (the paper), R = 80 epochs (the ramp-up of ONE's reference code).
    The gate is built by :meth:`attach` (sized by the trunk's channels); it is trained and
    checkpointed with the graph but never exported.
    parts: "hard" = CE(y, z_k), "ensemble" = CE(y, z_e) / K, "soft" = T^2 KL_k (before w).
    """

    #: Lan et al.'s ONE sums the branch losses with no rescaling of the trunk's gradient
    graph_defaults = {"rescale": "none"}

    def __init__(self, temperature: Temperature = 3.0, rampup_epochs: RampupEpochs = 80.0
                 ) -> None:
        super().__init__()
        self.temperature, self.rampup_epochs = temperature, rampup_epochs
        self.gate: nn.Sequential | None = None

    def attach(self, graph: TrainingGraph) -> None:
        """Build the gate on ``graph``'s trunk (kept when a gate of that size exists already,
        so checkpointed gate weights still load); UserError when the heads share no trunk."""
        if graph.trunk is None:
            raise UserError(f"ONE needs a shared trunk: pattern tree with a split point; got "
                            f"pattern {graph.config.kind}")
        self.wants = (graph.trunk,)
        feature = probe(graph, self.wants).features[graph.trunk]
        if feature.dim() != 5:
            raise UserError(f"ONE gates on a convolutional trunk feature [B, C, h, w]; the "
                            f"trunk '{graph.trunk}' gives {tuple(feature.shape[1:])}")
        channels, branches = feature.shape[2], graph.num_heads
        linear = self.gate[2] if self.gate is not None else None
        if linear is None or (linear.in_features, linear.out_features) != (channels, branches):
            self.gate = make_gate(channels, branches).to(feature.device)

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.gate is None:
            raise UserError("NativeEnsembleLoss has no gate yet: call attach(graph) first (the "
                            "engine does)")
        k, t, step = logits.shape[0], self.temperature, context.step
        require_shared_batch(labels, "ONE")
        g = self.gate(context.features[self.wants[0]][0].float())         # [B, K]
        ensemble = torch.einsum("bk,kbc->bc", g, logits)
        with torch.no_grad():
            p_e = torch.softmax(ensemble / t, dim=-1).expand_as(logits)
        soft = kl_per_head(p_e, logits, t)
        hard = cross_entropy_per_head(logits, labels)
        mixed = cross_entropy_per_head(ensemble[None], labels[:1]).expand(k) / k
        weight = sigmoid_rampup(step.epochs_done, self.rampup_epochs)
        return hard + mixed + weight * soft, {"hard": hard, "ensemble": mixed, "soft": soft}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, rampup_epochs={self.rampup_epochs}"
