"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen et al., AAAI 2020).

Branch-based two-level distillation on a tree graph: heads ``0..m-1`` are auxiliary peers,
the last head is the group leader, the model kept for inference (its default export). Each peer
learns from its own attention-weighted mix of the peers' logits (self included), which keeps the
peers diverse; the leader learns from the plain mean of the peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from collabsurgery.errors import UserError
from collabsurgery.graphs.base import TrainingGraph
from collabsurgery.objectives.base import (LossContext, NonNegative, Objective, RampupEpochs,
                                           Temperature, cross_entropy_per_head, kl_per_head, probe,
                                           require_shared_batch, sigmoid_rampup)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


class PeerAttention(nn.Module):
    """Attention over peers from their features: ``[P, B, ...]`` -> weights ``[B, P, P]``.

    Each feature is average-pooled over its spatial dims (any size) to ``[P, B, D]``; with
    ``q = W_q h`` and ``k = W_k h`` (``Linear(D, D // factor)``, no bias, shared by the peers),
    ``alpha[b, a, j] = softmax_j(q_a[b] . k_j[b])``: row ``a`` says how much peer ``a``'s target
    takes from each peer ``j``, itself included; every row sums to 1.
    """

    def __init__(self, channels: int, factor: int = 8) -> None:
        super().__init__()
        width = max(1, channels // factor)
        self.query = nn.Linear(channels, width, bias=False)
        self.key = nn.Linear(channels, width, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        pooled = features.flatten(3).mean(-1) if features.dim() > 3 else features
        q, k = self.query(pooled), self.key(pooled)                  # [P, B, D']
        return torch.softmax(torch.einsum("abd,jbd->baj", q, k), dim=-1)


def _example_tree(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    """Peers that branch in the middle and keep their own last split point's feature."""
    return {"split": [points[len(points) // 2], points[-1]], "heads": 3, "branches": [3, 1]}


@register_objective("okddip", example=ObjectiveExample(kinds=("tree",),
                                                       graph={"tree": _example_tree}))
class PeerAttentionLoss(Objective):
    """OKDDip's loss over m peers (heads ``0..m-1``) and a leader (head ``m``, the last).

    With logits z, labels y, each peer's feature h_a at ``feature`` (average-pooled)::

        alpha = PeerAttention(h)                 # [B, m, m], rows sum to 1, self included
        t_a   = sum_j alpha[:, a, j] * z_j       # peer a's target logits
        t_L   = (1/m) sum_j z_j                  # the leader's target: the plain peer mean
        L     = sum_a CE(y, z_a) + CE(y, z_L)
                + w(t) T^2 [ sum_a KL(s(t_a/T) || s(z_a/T)) + KL(s(t_L/T) || s(z_L/T)) ]
        w(t)  = exp(-5 (1 - min(1, t / R))^2),  t = epochs done (Step.epochs_done)

    Nothing is detached, as in the authors' code (DefangChen/OKDDip at c052f5b,
    ``models/model_cifar/resnet_GL.py`` lines 238-240 build ``x_m = bmm(pro, attention^T)`` from
    the live peer logits ``pro`` and the attention of the live pooled branch features;
    ``train_GL.py`` line 104 gives the leader ``KL_Loss(x_stu, mean(output_batch))``, and
    ``utils.py`` ``KL_Loss`` detaches no teacher):

    - the logits z_j inside t_a and t_L carry gradient: peer a's KL also moves every peer j
      towards or away from it through t_a, and the leader's KL moves the peers through t_L;
    - alpha carries gradient: W_q, W_k learn through the peer targets t_a (no CE and not the
      leader's KL reaches them);
    - the features h fed to the attention carry gradient: the attention shapes each peer's
      branch (h is the branch's pooled feature, its classifier's input, as in the reference).

    Tested on parameter gradients against a transcription of the reference
    (``tests/test_reference_losses.py``). The one difference: the reference adds 1e-7 to the
    teacher's probabilities in each KL; we do not (a change below 1e-5 relative).
    Defaults are the reference code's: T = 3, R = 80 epochs (of 300), D' = D / 8.
    ``feature`` names a graph feature every head has its own copy of, e.g. the pooled features
    of a tree split at ``[layer2, global_pool]`` with ``branches: [H, 1]``; by default the
    graph's last split point. The attention is built by :meth:`attach`; it is trained and
    checkpointed with the graph but never exported.
    parts: "hard" = CE(y, z_k), "soft" = T^2 KL_k (before w).
    """

    min_heads = 3
    default_export = "last"
    #: train_GL.py sums the branch losses with no rescaling of the trunk's gradient
    graph_defaults = {"rescale": "none"}

    def __init__(
            self, temperature: Temperature = 3.0,
            weight: Annotated[NonNegative, Field(
                description="weight of the KL terms (before the ramp-up)")] = 1.0,
            rampup_epochs: RampupEpochs = 80.0,
            projection_factor: Annotated[int, Field(
                ge=1, description="the attention projects a D-channel feature to D / factor")] = 8,
            feature: Annotated[str | None, Field(
                description="the graph feature each peer has its own copy of (default: the "
                            "graph's last split point)")] = None) -> None:
        super().__init__()
        self.temperature, self.weight = temperature, weight
        self.rampup_epochs, self.projection_factor = rampup_epochs, projection_factor
        self.feature = feature
        self.attention: PeerAttention | None = None

    def attach(self, graph: TrainingGraph) -> None:
        """Build the attention on ``graph``'s per-peer feature (kept when one of that size
        exists, so checkpointed weights still load); UserError when the graph has no shared
        trunk or the feature is not each peer's own."""
        if graph.trunk is None:
            raise UserError(f"OKDDip needs peers branching from a shared trunk: pattern tree "
                            f"with a split point; got pattern {graph.config.kind}")
        names = list(getattr(graph, "feature_names", []))
        feature = self.feature or (names[-1] if names else None)
        hint = (f"split at [{graph.trunk}, <the model's pooled-feature split point, the last "
                f"`collabsurgery splits MODEL` lists, e.g. global_pool>] with branches "
                f"[{graph.num_heads}, 1]")
        if feature is None or feature == graph.trunk:
            raise UserError(f"OKDDip's attention reads each peer's own feature, but the only "
                            f"split point is the shared trunk '{graph.trunk}'; {hint}")
        self.wants = (feature,)
        h = probe(graph, self.wants).features[feature][: graph.num_heads - 1]
        if h.dim() < 3 or any(torch.equal(h[0], h[j]) for j in range(1, h.shape[0])):
            raise UserError(f"OKDDip's attention needs each peer's own feature, but peers share "
                            f"'{feature}' (shape {tuple(h.shape[1:])}); {hint}")
        channels = h.shape[2]
        if self.attention is None or self.attention.query.in_features != channels:
            self.attention = PeerAttention(channels, self.projection_factor).to(h.device)

    def head_roles(self, num_heads: int) -> list[str]:
        """Peers, then the leader."""
        return ["peer"] * (num_heads - 1) + ["leader"]

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.attention is None:
            raise UserError("PeerAttentionLoss has no attention yet: call attach(graph) first "
                            "(the engine does)")
        require_shared_batch(labels, "OKDDip")
        t, step = self.temperature, context.step
        peers = logits[:-1]
        # nothing detached: the reference code's gradients (see the class docstring)
        alpha = self.attention(context.features[self.wants[0]][:-1].float())
        peer_targets = torch.einsum("baj,jbc->abc", alpha, peers)
        leader_target = peers.mean(0, keepdim=True)
        targets = torch.cat([peer_targets, leader_target])
        soft = kl_per_head(torch.softmax(targets / t, dim=-1), logits, t)
        hard = cross_entropy_per_head(logits, labels)
        ramp = sigmoid_rampup(step.epochs_done, self.rampup_epochs)
        return hard + self.weight * ramp * soft, {"hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, weight={self.weight}, "
                f"rampup_epochs={self.rampup_epochs}, projection_factor={self.projection_factor}, "
                f"feature={self.feature!r}")
