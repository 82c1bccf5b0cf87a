"""KDCL: students distil from an ensemble of themselves (Guo et al., CVPR 2020, section 3).

The target constructions are small pure functions over detached logits ``[K, B, C]`` and
labels ``[B]`` that return the ensemble teacher's logits ``z_t`` ``[B, C]`` (paper eq. (3));
:class:`EnsembleTargetLoss` turns them into ``softmax(z_t / T)`` and the loss of eq. (2).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.objectives.base import (LossContext, Objective, check_number,
                                           cross_entropy_per_head, kl_per_head)

# Projected gradient on the simplex for KDCL-Linear: iterations and the step sizes tried in each
# (4^j / L for j < LINEAR_STEP_SIZES, L an upper bound on the curvature).
LINEAR_ITERATIONS = 60
LINEAR_STEP_SIZES = 8


def naive_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. (4): the logits ``[B, C]`` of the student with the lowest mean CE on the batch."""
    best = cross_entropy_per_head(logits, labels).argmin()
    return logits[best]


def minlogit_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eqs. (6)-(7): ``z_t[b, c] = min_k (z_k[b, c] - z_k[b, y_b])``, ``[B, C]``.

    Subtracting the target-class logit leaves each student's softmax unchanged (eq. (6)); the
    per-class minimum then keeps, for every wrong class, the students' lowest score relative
    to the right one, so the target is at least as confident as any student.
    """
    index = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return (logits - logits.gather(-1, index)).min(0).values


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` ``[..., K]`` onto the probability simplex
    (the exact sort-based algorithm of Duchi et al., ICML 2008)."""
    u = v.sort(-1, descending=True).values
    excess = u.cumsum(-1) - 1
    ranks = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - excess / ranks > 0).sum(-1, keepdim=True)  # >= 1: the largest entry is in it
    theta = excess.gather(-1, support - 1) / support
    return (v - theta).clamp_min(0)


def _mean_ce(weights: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE of the mixtures ``sum_k w[j, k] z_k`` for every row j of ``weights`` ``[J, K]``."""
    mixed = torch.einsum("jk,kbc->jbc", weights, logits)
    right = mixed.gather(-1, labels.view(1, -1, 1).expand(weights.shape[0], -1, 1)).squeeze(-1)
    return (torch.logsumexp(mixed, -1) - right).mean(-1)


def linear_weights(logits: Tensor, labels: Tensor, iterations: int = LINEAR_ITERATIONS) -> Tensor:
    """Eq. (5): convex weights ``w`` ``[K]`` (``w >= 0``, ``sum w = 1``) that minimise
    ``f(w) = CE(y, sum_k w_k z_k)`` over the batch, in float64.

    ``f`` is convex and smooth in ``w`` (CE is convex in the logits, which are linear in
    ``w``), so projected gradient descent with the exact simplex projection converges to the
    global minimum, vertices included, from the uniform start (the paper's initialisation).
    Each iteration tries the steps ``4^j / L`` (j = 0..7) in one batched evaluation and keeps
    the best point, the current one included, so ``f`` never rises. ``L`` bounds the
    curvature: ``d^T H d = mean_b Var_p(Z_b d) <= mean_b max_c ||Zc_b[c]||^2 ||d||^2`` with
    ``Zc_b`` the class-centred logits, so the step ``1 / L`` alone already guarantees the
    O(L / t) rate, and the longer steps reach a flat optimum far sooner. K is small, so an
    iteration costs a few ``[9, B, C]`` tensor operations, with no host synchronisation.
    """
    z = logits.double()
    k = z.shape[0]
    centred = z - z.mean(-1, keepdim=True)
    bound = centred.square().sum(0).amax(-1).mean().clamp_min(1e-12)
    steps = 4.0 ** torch.arange(LINEAR_STEP_SIZES, device=z.device, dtype=z.dtype) / bound
    onehot = torch.nn.functional.one_hot(labels, z.shape[-1]).to(z.dtype)
    w = torch.full((k,), 1.0 / k, device=z.device, dtype=z.dtype)
    for _ in range(iterations):
        p = torch.softmax(torch.einsum("k,kbc->bc", w, z), -1)
        grad = torch.einsum("bc,kbc->k", p - onehot, z) / z.shape[1]
        candidates = torch.cat([w[None], project_to_simplex(w - steps[:, None] * grad)])
        w = candidates[_mean_ce(candidates, z, labels).argmin()]
    return w


def linear_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. (5): ``sum_k w_k z_k`` ``[B, C]`` with the CE-optimal convex weights."""
    return torch.einsum("k,kbc->bc", linear_weights(logits, labels).to(logits.dtype), logits)


def general_weights(holdout_logits: Tensor, labels: Tensor, ridge: float = 1e-6) -> Tensor:
    """Eqs. (8)-(11): weights ``[K]`` from the students' hold-out errors, in float64.

    With ``f_k(x)`` student k's probability of the right class and ``t = 1`` the ideal, the
    error covariance is ``C_ij = mean_n (f_i - 1)(f_j - 1)`` (eq. 10) and eq. (11) gives
    ``w = C^{-1} 1 / (1^T C^{-1} 1)``, the weights minimising the ensemble's squared error
    under ``sum w = 1``. Two guards: a ridge of ``ridge * mean(diag C)`` on the diagonal keeps a
    singular ``C`` (students that agree perfectly, or a perfect one) solvable, and eq. (11) can
    give negative weights (or weights above 1), which would make the target no probability
    distribution, so ``w`` is projected onto the simplex (exact Euclidean projection).
    """
    z = holdout_logits.double()
    right = torch.softmax(z, -1).gather(-1, labels.view(1, -1, 1).expand(z.shape[0], -1, 1))
    errors = right.squeeze(-1) - 1.0                                # [K, N]
    cov = errors @ errors.T / errors.shape[1]                        # eq. (10)
    k = cov.shape[0]
    cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(k, dtype=cov.dtype,
                                                                            device=cov.device)
    inverse_rows = torch.linalg.solve(cov, torch.ones(k, dtype=cov.dtype, device=cov.device))
    return project_to_simplex(inverse_rows / inverse_rows.sum())     # eq. (11), then projected


TARGETS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "linear": linear_logits,
    "minlogit": minlogit_logits,
    "naive": naive_logits,
}


class EnsembleTargetLoss(Objective):
    """Every student learns from the labels and from one target built from all students.

    For K >= 2 students with logits z_k (B examples), labels y::

        z_t  = h(z_1, ..., z_K)                 # eq. (3), detached: naive / linear / minlogit
        p_t  = softmax(z_t / T)
        L_k  = CE(y, z_k) + lambda * T^2 * KL(p_t || softmax(z_k / T))      # eq. (2)
        KL   = (1/B) sum_b sum_i p_t[b, i] * (log p_t[b, i] - log softmax(z_k[b] / T)_i)
        L    = sum_k L_k

    naive (eq. 4): z_t = the z_k with the lowest CE on the batch. linear (eq. 5): z_t =
    sum_k w_k z_k with the convex w minimising CE(y, z_t) on the batch. minlogit (eqs. 6-7):
    z_t[b, c] = min_k (z_k[b, c] - z_k[b, y_b]). The paper's CIFAR setting is T=2, lambda=1.
    general (eqs. 8-11): p_t = sum_k w_k softmax(z_k / T), a weighted average of
    PROBABILITIES, with ``w`` from :func:`general_weights` on the students' hold-out outputs,
    recomputed after every epoch (equal weights before the first update); ``w`` is a buffer,
    so it is checkpointed and a resumed run uses the same weights.
    parts: "hard" = CE, "soft" = T^2 KL (before lambda).
    """

    min_heads = 2

    def __init__(self, target: str = "minlogit", temperature: float = 2.0,
                 weight: float = 1.0) -> None:
        super().__init__()
        valid = sorted([*TARGETS, "general"])
        if not isinstance(target, str) or target not in valid:
            raise ArgumentError("target", f"must be one of {', '.join(valid)}, got {target!r}")
        self.target = target
        self.wants_holdout = target == "general"
        if target == "general":  # sized by check_compatible (the engine) or the first batch
            self.register_buffer("general_weights", torch.ones(0))
        self.temperature = check_number("temperature", temperature, 0, low_open=True)
        self.weight = check_number("weight", weight, 0)

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        t = self.temperature
        # labels expanded from [B] have stride 0: the common case costs no synchronisation
        if labels.stride(0) != 0 and not torch.equal(labels, labels[:1].expand_as(labels)):
            raise UserError("kdcl builds one target from all students, so every student must "
                            "see the same examples; got different labels per head")
        with torch.no_grad():
            if self.target == "general":
                self.check_compatible(*logits.shape[::2])
                w = self.general_weights.to(logits.dtype).view(-1, 1, 1)
                p_t = (w * torch.softmax(logits / t, dim=-1)).sum(0).expand_as(logits)
            else:
                z_t = TARGETS[self.target](logits, labels[0])
                p_t = torch.softmax(z_t / t, dim=-1).expand_as(logits)
        soft = kl_per_head(p_t, logits, t)
        hard = cross_entropy_per_head(logits, labels)
        return hard + self.weight * soft, {"hard": hard, "soft": soft}

    def check_compatible(self, num_heads: int, num_classes: int) -> None:
        """Also sizes General's weights: equal until the first hold-out update."""
        super().check_compatible(num_heads, num_classes)
        if self.target == "general" and self.general_weights.numel() != num_heads:
            self.general_weights = torch.full((num_heads,), 1.0 / num_heads,
                                              device=self.general_weights.device)

    def end_epoch(self, holdout_logits: Tensor, holdout_labels: Tensor) -> None:
        """KDCL-General: new weights from this epoch's hold-out outputs."""
        if self.target == "general":
            w = general_weights(holdout_logits, holdout_labels)
            self.general_weights.copy_(w.to(self.general_weights))

    def extra_repr(self) -> str:
        return f"target={self.target}, temperature={self.temperature}, weight={self.weight}"
