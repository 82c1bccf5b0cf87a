"""KDCL: students distil from an ensemble of themselves (Guo et al., CVPR 2020, section 3).

The target constructions are small pure functions over detached logits ``[K, B, C]`` and
labels ``[B]`` that return the ensemble teacher's logits ``z_t`` ``[B, C]`` (paper eq. (3));
:class:`EnsembleTargetLoss` turns them into ``softmax(z_t / T)`` and the loss of eq. (2).
Naive and Linear also take soft targets ``[B, C]`` (mixup, cutmix, label smoothing): their CE
is then the soft CE, ``-sum_c t_c log softmax(z)_c``, and a one-hot target gives the label's
choice exactly. MinLogit subtracts the true class's logit, which a soft target has not.

Every logit target is built per example, as the paper writes eqs. (4), (5) and (7): "Let matrix
Z = (z_1^T; z_2^T; ...; z_m^T). Each column of the matrix Z represents the logit of a student"
(section 3.2, KDCL-Linear): Z holds one logit vector per student, i.e. one example's, and eq.
(1) distils each example i from its own soft target p_i. So Naive chooses a student for each
example, Linear solves eq. (5) for each example, and MinLogit takes its minimum per example and
class. Nothing in the paper chooses per mini-batch, so there is no per-batch option.
"""

from __future__ import annotations

from typing import Annotated, Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

from collabsurgery.errors import UserError
from collabsurgery.objectives.base import (LossContext, NonNegative, Objective, Temperature,
                                           cross_entropy_per_head, kl_per_head)
from collabsurgery.objectives.registry import ObjectiveExample, register_objective

# Projected gradient on the simplex for KDCL-Linear: iterations and the step sizes tried in each
# (4^j / L for j < LINEAR_STEP_SIZES, L an upper bound on the curvature).
LINEAR_ITERATIONS = 60
LINEAR_STEP_SIZES = 8
#: KDCL-General solves eq. (9) on the simplex over all 2^K - 1 supports of K students
GENERAL_MAX_STUDENTS = 12


def _example_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """CE of every student on every example: ``[K, B, C]``, labels ``[B]`` or soft targets
    ``[B, C]`` -> ``[K, B]``."""
    if labels.is_floating_point():  # targets sum to 1: -sum_c t_c (z_c - lse) = lse - t . z
        right = (logits * labels).sum(-1)
    else:
        right = logits.gather(-1, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    return torch.logsumexp(logits, -1) - right


def naive_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. (4) per example: ``z_t[b]`` is the logits of the student with the lowest CE on
    example b (the first such student on a tie), ``[B, C]``; labels ``[B]`` or soft targets
    ``[B, C]``."""
    best = _example_ce(logits, labels).argmin(0)                              # [B]
    return logits.gather(0, best.view(1, -1, 1).expand(1, -1, logits.shape[-1])).squeeze(0)


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


def _example_mix_ce(weights: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """CE on example b of the mixtures ``sum_k w[b, j, k] z_k[b]`` for every candidate j of
    ``weights`` ``[B, J, K]``: ``[B, J]`` (labels ``[B]`` or soft targets ``[B, C]``)."""
    mixed = torch.einsum("bjk,kbc->bjc", weights, logits)
    if labels.is_floating_point():
        right = (mixed * labels[:, None]).sum(-1)
    else:
        right = mixed.gather(-1, labels.view(-1, 1, 1).expand(-1, weights.shape[1], 1)).squeeze(-1)
    return torch.logsumexp(mixed, -1) - right


def linear_weights(logits: Tensor, labels: Tensor, iterations: int = LINEAR_ITERATIONS) -> Tensor:
    """Eq. (5) for every example: convex weights ``w[b]`` (``w >= 0``, ``sum_k w[b, k] = 1``)
    that minimise ``f_b(w) = CE(y_b, sum_k w_k z_k[b])``, ``[B, K]``, in float64; labels ``[B]``
    or soft targets ``[B, C]`` (the soft CE, as convex in the logits).

    Each ``f_b`` is convex and smooth in ``w`` (CE is convex in the logits, which are linear
    in ``w``), so projected gradient descent with the exact simplex projection converges to the
    global minimum, vertices included. It starts from the best of the uniform weights (the
    paper's initialisation) and the K vertices (each student alone), so the mix is never worse
    than Naive's student. Each iteration tries the steps ``4^j / L_b`` (j = 0..7) in one
    batched evaluation and keeps each example's best point, the current one included, so no
    ``f_b`` ever rises. ``L_b`` bounds example b's curvature: ``d^T H d = Var_p(Z_b d) <=
    max_c ||Zc_b[c]||^2 ||d||^2`` with ``Zc_b`` the class-centred logits, so the step
    ``1 / L_b`` alone already guarantees the O(L_b / t) rate, and the longer steps reach a flat
    optimum far sooner. K is small, so an iteration costs a few ``[B, 9, C]`` tensor
    operations, with no host synchronisation.
    """
    z = logits.double()
    k, b = z.shape[:2]
    centred = z - z.mean(-1, keepdim=True)
    bound = centred.square().sum(0).amax(-1).clamp_min(1e-12)                  # [B]
    steps = 4.0 ** torch.arange(LINEAR_STEP_SIZES, device=z.device, dtype=z.dtype) \
        / bound[:, None]                                                        # [B, S]
    if labels.is_floating_point():
        labels = onehot = labels.to(z.dtype)
    else:
        onehot = torch.nn.functional.one_hot(labels, z.shape[-1]).to(z.dtype)
    eye = torch.eye(k, device=z.device, dtype=z.dtype)
    starts = torch.cat([torch.full((1, k), 1.0 / k, device=z.device, dtype=z.dtype), eye])
    starts = starts.expand(b, k + 1, k)

    def best_of(candidates: Tensor) -> Tensor:                                  # [B, J, K]
        pick = _example_mix_ce(candidates, z, labels).argmin(-1)                # [B]
        return candidates.gather(1, pick.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)

    w = best_of(starts)                                                         # [B, K]
    for _ in range(iterations):
        p = torch.softmax(torch.einsum("bk,kbc->bc", w, z), -1)
        grad = torch.einsum("bc,kbc->bk", p - onehot, z)
        moved = project_to_simplex(w[:, None] - steps[..., None] * grad[:, None])  # [B, S, K]
        w = best_of(torch.cat([w[:, None], moved], 1))
    return w


def linear_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Eq. (5) per example: ``z_t[b] = sum_k w[b, k] z_k[b]`` ``[B, C]`` with each example's
    CE-optimal convex weights (labels ``[B]`` or soft targets ``[B, C]``)."""
    w = linear_weights(logits, labels).to(logits.dtype)
    return torch.einsum("bk,kbc->bc", w, logits)


def simplex_quadratic_minimum(cov: Tensor) -> Tensor:
    """The ``w`` ``[K]`` that minimises ``E(w) = w^T C w`` subject to ``w >= 0`` and
    ``sum w = 1``, for a symmetric positive definite ``C`` ``[K, K]``, exactly.

    ``E`` is strictly convex, so the minimum is unique, and on its support S (its non-zero
    weights) it is the minimum under ``sum w = 1`` alone: ``w_S = C_SS^{-1} 1 / (1^T C_SS^{-1}
    1)``, eq. (11) on S. Every one of the 2^K - 1 supports gives such a candidate (solved in
    one batched call, each system padded with the identity off its support); the candidates with
    no negative weight are feasible, the optimum's own support is among them, and no feasible
    point has a lower ``E``: the feasible candidate of the lowest ``E`` is the minimum. K is
    the number of students: at most :data:`GENERAL_MAX_STUDENTS` (4,095 solves of 12 x 12).
    """
    k = cov.shape[0]
    if k > GENERAL_MAX_STUDENTS:
        raise UserError(f"KDCL-General solves its weights exactly over all 2^K - 1 subsets of "
                        f"its K students: at most {GENERAL_MAX_STUDENTS} students, got {k}")
    bits = torch.arange(k, device=cov.device)
    masks = ((torch.arange(1, 2 ** k, device=cov.device)[:, None] >> bits) & 1).to(cov.dtype)
    systems = cov * masks[:, :, None] * masks[:, None, :] + torch.diag_embed(1 - masks)
    x = torch.linalg.solve(systems, masks)                                  # zero off support
    w = x / x.sum(-1, keepdim=True)
    feasible = w.amin(-1) >= -1e-9  # rounding of weights that are 0 at the optimum
    w = w.clamp_min(0)
    w = w / w.sum(-1, keepdim=True)
    energy = torch.einsum("sk,kl,sl->s", w, cov, w)
    energy = torch.where(feasible, energy, torch.full_like(energy, float("inf")))
    return w[energy.argmin()]


def general_weights(holdout_logits: Tensor, labels: Tensor, ridge: float = 1e-6) -> Tensor:
    """Eqs. (8)-(11): weights ``[K]`` from the students' hold-out errors, in float64.

    With ``f_k(x)`` student k's probability of the right class and ``t = 1`` the ideal, the
    error covariance is ``C_ij = mean_n (f_i - 1)(f_j - 1)`` (eq. 10), and the weights are the
    minimum of the ensemble's squared error ``E = w^T C w`` (eq. 9) under the paper's
    constraint "The weight should satisfy w_i in [0, 1] (i = 1, 2, ..., m) and sum_i w_i = 1"
    (section 3.2, KDCL-General), solved exactly (:func:`simplex_quadratic_minimum`). That is
    eq. (11), ``w = C^{-1} 1 / (1^T C^{-1} 1)``, whenever eq. (11)'s weights are all >= 0;
    where eq. (11) goes negative (it minimises E under ``sum w = 1`` alone) the minimum lies
    on a face of the simplex, which a projection of eq. (11) onto the simplex does not find. A
    ridge of ``ridge * mean(diag C)`` on the diagonal keeps a singular ``C`` (students that
    agree perfectly, or a perfect one) solvable and the minimum unique.
    """
    z = holdout_logits.double()
    right = torch.softmax(z, -1).gather(-1, labels.view(1, -1, 1).expand(z.shape[0], -1, 1))
    errors = right.squeeze(-1) - 1.0                                # [K, N]
    cov = errors @ errors.T / errors.shape[1]                        # eq. (10)
    k = cov.shape[0]
    cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(k, dtype=cov.dtype,
                                                                            device=cov.device)
    return simplex_quadratic_minimum(cov)                            # eq. (9) on the simplex


TARGETS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "linear": linear_logits,
    "minlogit": minlogit_logits,
    "naive": naive_logits,
}
#: the ensemble targets: TARGETS' logits, or "general"'s weighted average of probabilities
Target = Annotated[Literal[tuple(sorted([*TARGETS, "general"]))], Field(
    description="the ensemble teacher: naive (eq. 4), linear (eq. 5), minlogit (eqs. 6-7) or "
                "general (eqs. 8-11, weights from the hold-out split)")]


# "general" exercises end_epoch and a checkpointed buffer; "views" is KDCL's ICL
@register_objective("kdcl", example=ObjectiveExample(args={"target": "general"},
                                                     data="views"))
class EnsembleTargetLoss(Objective):
    """Every student learns from the labels and from one target built from all students.

    For K >= 2 students with logits z_k (B examples), labels y::

        z_t  = h(z_1, ..., z_K)                 # eq. (3), detached, per example:
                                                # naive / linear / minlogit
        p_t  = softmax(z_t / T)
        L_k  = CE(y, z_k) + lambda * T^2 * KL(p_t || softmax(z_k / T))      # eq. (2)
        KL   = (1/B) sum_b sum_i p_t[b, i] * (log p_t[b, i] - log softmax(z_k[b] / T)_i)
        L    = sum_k L_k

    Per example b, as the paper's "Each column of the matrix Z represents the logit of a
    student" reads (module docstring): naive (eq. 4): z_t[b] = the z_k[b] with the lowest CE on
    example b. linear (eq. 5): z_t[b] = sum_k w[b, k] z_k[b] with the convex w[b] minimising
    CE(y_b, z_t[b]). minlogit (eqs. 6-7): z_t[b, c] = min_k (z_k[b, c] - z_k[b, y_b]). The
    paper's CIFAR setting is T=2, lambda=1. Soft targets t (mixup, cutmix, label smoothing)
    replace y in every CE (naive's and linear's choices included); minlogit refuses them.
    general (eqs. 8-11): p_t = sum_k w_k softmax(z_k / T), a weighted average of
    PROBABILITIES, with ``w`` from :func:`general_weights` on the students' hold-out outputs
    (eq. 9's minimum on the simplex), recomputed after every epoch (equal weights before the
    first update); ``w`` is a buffer, so it is checkpointed and a resumed run uses the same
    weights. At most :data:`GENERAL_MAX_STUDENTS` students with general.
    parts: "hard" = CE, "soft" = T^2 KL (before lambda).
    """

    min_heads = 2

    def __init__(self, target: Target = "minlogit", temperature: Temperature = 2.0,
                 weight: Annotated[NonNegative, Field(
                     description="lambda: weight of the KL term")] = 1.0) -> None:
        super().__init__()
        self.target = target
        self.wants_holdout = target == "general"
        if target == "general":  # sized by check_compatible (the engine) or the first batch
            self.register_buffer("general_weights", torch.ones(0))
        self.temperature, self.weight = temperature, weight

    def soft_target_problem(self) -> str | None:
        """MinLogit needs each example's true class; the other targets take soft targets."""
        if self.target == "minlogit":
            return ("kdcl target 'minlogit' subtracts the true class's logit, and a soft target "
                    "(mixed or smoothed) names no single true class; valid with mixup/cutmix/"
                    "label smoothing: target naive, linear or general")
        return None

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
        if self.target == "general" and num_heads > GENERAL_MAX_STUDENTS:
            raise UserError(f"kdcl's general target solves its weights exactly over all "
                            f"2^K - 1 subsets of its K students: at most {GENERAL_MAX_STUDENTS} "
                            f"students, got {num_heads}")
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
