"""PCL: Peer Collaborative Learning for Online Knowledge Distillation (Wu & Gong, AAAI 2021).

m peers branch from a shared trunk (a tree graph built with ``views``), each on its own
augmentation of the batch (``data.views=per_head``). Two teachers: the peer ensemble teacher, a
classifier over the peers' concatenated features, and the peer mean teachers, the temporal means
(EMA weights) of the peers. The model kept, and exported by default, is the temporal mean of the
best peer on the hold-out split: the paper deploys a peer's temporal mean, not a live peer.

Reference: shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation at commit
6afb4730bc5a35a11f7a0097ef94d0d17d3b6772, a public reproduction of the paper (not the authors'
code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from collabsurgery.errors import UserError
from collabsurgery.graphs.base import INPUT, TrainingGraph
from collabsurgery.objectives.base import (LossContext, Objective, RampupEpochs, Temperature,
                                           cross_entropy_per_head, kl_per_head, probe,
                                           require_shared_batch, sigmoid_rampup)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective


def pooled(features: Tensor) -> Tensor:
    """Each peer's feature ``[m, B, D, ...]`` average-pooled over its spatial dims, if any:
    ``[m, B, D]``."""
    return features.flatten(3).mean(-1) if features.dim() > 3 else features


def _example_tree(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    """Peers that branch in the middle, keep their own pooled feature and take views."""
    return {"split": [points[len(points) // 2], points[-1]], "heads": 3, "branches": [3, 1],
            "views": True}


@register_objective("pcl", example=ObjectiveExample(kinds=("tree",), data="views",
                                                    graph={"tree": _example_tree}))
class PeerCollaborativeLoss(Objective):
    """PCL's loss over m >= 2 peers (every head is a peer; head i sees view i).

    With peer logits z_i, each peer's pooled feature f_i (at ``feature``), labels y, the temporal
    mean logits z'_j (the EMA of the graph, run on the same views, no gradient) and
    s(.) = softmax(. / T)::

        z_e   = W [f_1; ...; f_m] + b                 # the peer ensemble teacher (Linear(m D, C))
        L_ce  = CE(y, z_e) + sum_i CE(y, z_i)
        L_pe  = sum_i T^2 KL(s(z_e) || s(z_i))        # s(z_e) DETACHED
        L_pm  = sum_i 1/(m-1) sum_{j != i} T^2 KL(s(z'_j) || s(z_i))
        L     = L_ce + w(t) (L_pe + L_pm)
        w(t)  = exp(-5 (1 - min(1, t / R))^2),  t = epochs done (Step.epochs_done)

    Head i's loss is ``CE(y, z_i) + CE(y, z_e) / m + w(t) (pe_i + pm_i)``, so the heads sum to L.
    Gradients: CE(y, z_e) trains the fusion classifier and, through the features f_i (not
    detached), every peer's branch and the trunk; the KL to s(z_e) trains only peer i (its
    target is detached, so it never moves the fusion classifier or the other peers); the KL to
    the temporal means trains only peer i (the EMA runs under no_grad and is moved only by the
    engine's update after each optimizer step).

    The reference, file by file (``tests/test_pcl.py`` compares a transcription of its loss):

    - ``src/models/resnet.py`` l. 108-121, 161, 207-220: each branch returns its logits and its
      average-pooled feature; ``en_fc = nn.Linear(fc.in_features * 3, num_classes)`` on
      ``torch.cat([feat1, feat2, feat3], dim=1)``: the fusion classifier is one Linear layer;
      the trunk (``extract``) runs once per view.
    - ``src/controller.py`` l. 37-43: peer i on view i; the ensemble target ``en_output.detach()``;
      the mean model runs on the same three views.
    - ``src/losses/kd_loss.py`` l. 8-41: ``KLDivLoss(batchmean)(log_softmax(z/T), softmax(t/T))
      * T^2`` with T = 3; ``PMLoss`` averages the KLs to the other peers' (detached) mean
      outputs: L_pm above, a mean of KLs, not one KL to the mean of their predictions.
    - ``src/losses/loss_wrapper.py`` l. 37-61: the sum above, every loss weight 1.
    - ``src/utils/ema.py`` l. 3-7, ``src/trainer.py`` l. 111: EMA decay 0.999 after every step.

    Where this departs from that code (following the paper or the engine):

    - ramp-up: the code's ``compute_rampup_weight`` (``loss_wrapper.py`` l. 18-22) computes
      ``exp(-5 (1 - epoch / lambd)^2)`` with ``lambd = 1``, a slip for ``alpha = 80``: its KL
      weight is 1 at epoch 1 and ~0 from epoch 3 to 80. We use the paper's (and mean teacher's)
      sigmoid ramp-up over R = 80 epochs, counted in fractional epochs (as ONE here); the two
      agree at epoch 0 and after epoch 80.
    - the temporal mean is the engine's timm ``ModelEmaV3`` of the whole graph
      (``train.ema_decay``; the objective declares ``wants_temporal_mean`` and the engine refuses
      a recipe without ``train.ema_decay`` and ``train.ema_select``): it averages buffers too
      and runs in eval mode, where the code's mean model keeps its own BatchNorm statistics and
      runs in train mode; it starts as a copy of the live weights, not a fresh initialisation,
      and its decay is 0 after the first update, then ``ema_decay`` (or timm's warm-up), where
      the code ramps it as ``min(1 - 1 / (step + 1), 0.999)``.
    - deployment: the EMA weights of the best peer on the hold-out split (``ema_select``; the
      reproduction's README, l. 37, also keeps the best of the three peers; the paper reports
      the first peer's temporal mean, logged here as head 0's EMA accuracy).
    - the code's three peers are any m >= 2 here; L_pm's 1/(m-1) is its average.

    Without a temporal mean (``context.temporal_mean`` None: an API call outside the engine, as
    the contract tests make) the peers' own detached logits stand in for it: an EMA of decay 0.
    Defaults: T = 3, R = 80 epochs (of 300). ``feature`` names the graph feature each peer has
    its own copy of, e.g. the pooled features of a tree split at ``[layer2, global_pool]`` with
    ``branches: [m, 1]``; by default the graph's last split point. The fusion classifier is
    built by :meth:`attach`; it is trained and checkpointed with the graph but never exported.
    parts: "hard" = CE(y, z_i), "ensemble" = CE(y, z_e) / m, "peer_ensemble" = pe_i,
    "peer_mean" = pm_i (both before w).
    """

    min_heads = 2
    wants_temporal_mean = True
    wants_views = True
    #: the reference sums the losses with no rescaling of the trunk's gradient; each peer's
    #: path runs on its own view
    graph_defaults = {"rescale": "none", "views": True}

    def __init__(
            self, temperature: Temperature = 3.0, rampup_epochs: RampupEpochs = 80.0,
            feature: Annotated[str | None, Field(
                description="the graph feature each peer has its own copy of, fed to the "
                            "fusion classifier (default: the graph's last split point)")] = None
    ) -> None:
        super().__init__()
        self.temperature, self.rampup_epochs, self.feature = temperature, rampup_epochs, feature
        self.fusion: nn.Linear | None = None

    def attach(self, graph: TrainingGraph) -> None:
        """Build the fusion classifier on the peers' concatenated features (kept when one of
        that size exists, so checkpointed weights still load); UserError when the graph is not
        a tree of peers on a shared trunk taking per-head views, or the feature is not each
        peer's own."""
        if graph.trunk is None:
            raise UserError(f"PCL needs peers branching from a shared trunk: pattern tree with a "
                            f"split point; got pattern {graph.config.kind}")
        hint = (f"split at [{graph.trunk}, <the model's pooled-feature split point, the last "
                f"`collabsurgery splits MODEL` lists, e.g. global_pool>] with branches "
                f"[{graph.num_heads}, 1]")
        if not graph.per_head_input:
            raise UserError("PCL trains each peer on its own view of the batch, but this tree "
                            "takes one shared batch; set graph.views=true")
        names = list(getattr(graph, "feature_names", []))
        feature = self.feature or (names[-1] if names else None)
        if feature is None or feature == graph.trunk:
            raise UserError(f"PCL's fusion classifier reads each peer's own feature, but the only "
                            f"split point is the shared trunk '{graph.trunk}'; {hint}")
        self.wants = (INPUT, feature)
        out = probe(graph, (feature,))
        h = out.features[feature]
        if h.dim() < 3 or any(torch.equal(h[0], h[j]) for j in range(1, h.shape[0])):
            raise UserError(f"PCL's fusion classifier needs each peer's own feature, but peers "
                            f"share '{feature}' (shape {tuple(h.shape[1:])}); {hint}")
        width, classes = graph.num_heads * h.shape[2], out.logits.shape[-1]
        if self.fusion is None or (self.fusion.in_features, self.fusion.out_features) \
                != (width, classes):
            self.fusion = nn.Linear(width, classes).to(h.device)

    def head_roles(self, num_heads: int) -> list[str]:
        """Every head is a peer."""
        return ["peer"] * num_heads

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.fusion is None:
            raise UserError("PeerCollaborativeLoss has no fusion classifier yet: call "
                            "attach(graph) first (the engine does)")
        require_shared_batch(labels, "PCL")
        m, b, t = logits.shape[0], logits.shape[1], self.temperature
        f = pooled(context.features[self.wants[1]].float())                  # [m, B, D]
        ensemble = self.fusion(f.transpose(0, 1).reshape(b, -1))[None]        # [1, B, C]
        with torch.no_grad():
            p_e = torch.softmax(ensemble / t, dim=-1).expand_as(logits)
            mean_logits = logits.detach() if context.temporal_mean is None else \
                context.temporal_mean(context.features[INPUT]).float()
            p_mean = torch.softmax(mean_logits / t, dim=-1)                  # [m, B, C]
        peer_ensemble = kl_per_head(p_e, logits, t)
        pairs = kl_per_head(p_mean[:, None], logits[None], t)                # [j, i]
        others = ~torch.eye(m, dtype=torch.bool, device=logits.device)
        peer_mean = (pairs * others).sum(0) / (m - 1)
        hard = cross_entropy_per_head(logits, labels)
        mixed = cross_entropy_per_head(ensemble, labels[:1]).expand(m) / m
        weight = sigmoid_rampup(context.step.epochs_done, self.rampup_epochs)
        return hard + mixed + weight * (peer_ensemble + peer_mean), {
            "hard": hard, "ensemble": mixed, "peer_ensemble": peer_ensemble,
            "peer_mean": peer_mean}

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, rampup_epochs={self.rampup_epochs}, "
                f"feature={self.feature!r}")
