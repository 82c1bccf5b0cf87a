"""Intra-model collaboration (paper 004, section III): losses over one network's dropout views.

Built so far: L_out (eq. 4) and kernel decorrelation (eq. 10), each switched on by a weight > 0.
L_mid (eqs. 5-7) and pull-push (eqs. 8-9) are not built yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.base import TrainingGraph
from collabsurgery.objectives.base import (LossContext, Objective, check_number,
                                           cross_entropy_per_head, soft_cross_entropy)


def kernel_decorrelation(weight: Tensor) -> Tensor:
    """Eq. 10 for one convolution: ``W`` reshaped to ``F x G`` (one row per filter), each row
    standardised (mean 0, std 1), ``C = W~ W~^T / G``, loss ``||C - diag(C)||_F``: how
    correlated the filters are."""
    rows = weight.flatten(1).float()
    rows = (rows - rows.mean(1, keepdim=True)) / rows.std(1, unbiased=False, keepdim=True) \
        .clamp_min(1e-12)
    c = rows @ rows.T / rows.shape[1]
    return (c - torch.diag(torch.diagonal(c))).norm()


def _module_names(graph: TrainingGraph) -> dict[str, nn.Module]:
    """The graph's modules under the plain model's names (a staged graph's stages keep them)."""
    stages = getattr(graph, "stages", None)
    if stages is None:
        return dict(graph.named_modules())
    names: dict[str, nn.Module] = {}
    for copies in stages:
        names.update(dict(copies[0].named_modules()))
    return names


class IntraModelLoss(Objective):
    """L_out over the views and kernel decorrelation, each weighted (0 switches it off).

    L_out, view i of V (paper 004, eq. 4; eq. 2's J_soft, which has no T^2)::

        q_i  = softmax( (1/(V-1)) sum_{j != i} z_j / T )           # detached
        L_i  = alpha_out CE(y, z_i) + (1 - alpha_out) J_soft(q_i, z_i)
        J_soft(q, z) = (1/B) sum_b -sum_c q[b, c] log softmax(z[b] / T)_c

    the engine averages the views through the dropout graph's loss weight 1/V. With one view the
    soft term is off. Kernel decorrelation: the sum of :func:`kernel_decorrelation` over the
    convolutions named by ``kernel_layers`` (module names or prefixes of them, e.g. ``layer4``;
    default: the convolutions of the model's last two top-level stages that hold any, the
    paper's best), times ``kernel_weight``, added once per step.
    Defaults: K=2 views per point is the graph's; T=2, alpha_out=0.5 (the paper's).
    parts: "hard" = CE, "soft" = J_soft, "kernel" = the decorrelation loss (its share per head).
    """

    def __init__(self, out_weight: float = 1.0, alpha_out: float = 0.5,
                 temperature: float = 2.0, kernel_weight: float = 0.0,
                 kernel_layers: Sequence[str] | None = None) -> None:
        super().__init__()
        self.out_weight = check_number("out_weight", out_weight, 0)
        self.alpha_out = check_number("alpha_out", alpha_out, 0, 1)
        self.temperature = check_number("temperature", temperature, 0, low_open=True)
        self.kernel_weight = check_number("kernel_weight", kernel_weight, 0)
        if kernel_layers is not None and (isinstance(kernel_layers, str) or not all(
                isinstance(n, str) for n in kernel_layers)):
            raise ArgumentError("kernel_layers", f"must be a list of module names, got "
                                                 f"{kernel_layers!r}")
        self.kernel_layers = None if kernel_layers is None else list(kernel_layers)
        self.convolutions: list[nn.Conv2d] = []
        self.kernel_share = 1.0

    def attach(self, graph: TrainingGraph) -> None:
        """Find the kernel layers' convolutions; UserError for a name that is not one."""
        self.kernel_share = 1.0 / (graph.num_heads * graph.loss_weight)
        if not self.kernel_weight:
            return
        modules = _module_names(graph)
        names = self.kernel_layers or _last_stages(modules)
        convolutions = []
        for name in names:
            found = [m for n, m in modules.items() if n == name or n.startswith(name + ".")]
            if not found:
                raise ArgumentError("kernel_layers", f"'{name}' is not a module of the model")
            convs = [m for m in found if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ArgumentError("kernel_layers", f"'{name}' holds no convolution "
                                                     f"({type(found[0]).__name__})")
            convolutions += [c for c in convs if all(c is not k for k in convolutions)]
        self.convolutions = convolutions

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        v, t = logits.shape[0], self.temperature
        hard = cross_entropy_per_head(logits, labels)
        soft = torch.zeros_like(hard)
        if v > 1:
            with torch.no_grad():
                q = torch.softmax((logits.sum(0, keepdim=True) - logits) / (v - 1) / t, dim=-1)
            soft = soft_cross_entropy(q, logits, t) / t**2  # eq. 2: no T^2
        out = self.alpha_out * hard + (1 - self.alpha_out) * soft
        kernel = torch.zeros_like(hard)
        if self.kernel_weight:
            if not self.convolutions:
                raise UserError("IntraModelLoss has no kernel layers yet: call attach(graph) "
                                "first (the engine does)")
            total = sum(kernel_decorrelation(c.weight) for c in self.convolutions)
            kernel = (total * self.kernel_share).expand(v)
        return self.out_weight * out + self.kernel_weight * kernel, \
            {"hard": hard, "soft": soft, "kernel": kernel}

    def extra_repr(self) -> str:
        return (f"out_weight={self.out_weight}, alpha_out={self.alpha_out}, "
                f"temperature={self.temperature}, kernel_weight={self.kernel_weight}, "
                f"kernel_layers={self.kernel_layers}")


def _last_stages(modules: dict[str, nn.Module]) -> list[str]:
    """The last two top-level modules that hold a convolution, in model order."""
    tops = list(dict.fromkeys(n.split(".")[0] for n, m in modules.items()
                              if n and isinstance(m, nn.Conv2d)))
    if not tops:
        raise UserError("kernel decorrelation needs convolutions; the model has none")
    return tops[-2:]
