"""Soft targets (mixup, cutmix, label smoothing) in the objectives, beside the registry-wide
check of ``test_objective_contract.py`` (one-hot targets give the labels' loss and gradients, a
mixed batch trains every parameter, a refusal is one line).

Here: the soft cross entropy and label smoothing against the hand formula, the shapes
``forward`` takes, smoothed targets end to end (single vs label_smoothing, consensus), KDCL's
targets (naive and linear take soft targets, minlogit refuses them) and intra's local losses.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from collabsurgery.errors import UserError
from collabsurgery.objectives import EnsembleTargetLoss, build_objective
from collabsurgery.objectives.base import cross_entropy_per_head
from collabsurgery.objectives.ensemble import linear_weights, naive_logits
from collabsurgery.objectives.local_losses import mid_losses, pull_push_losses, similarity

from helpers import random_logits

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1


def smoothed(labels: torch.Tensor, classes: int, eps: float = EPS) -> torch.Tensor:
    """Label smoothing's targets ``(1 - eps) onehot(y) + eps / C``."""
    return (1 - eps) * F.one_hot(labels, classes).double() + eps / classes


def mixed(labels: torch.Tensor, classes: int, lam: float = 0.7) -> torch.Tensor:
    """``lam`` of each example's label and ``1 - lam`` of the batch read backwards (mixup)."""
    return lam * F.one_hot(labels, classes).float() + \
        (1 - lam) * F.one_hot(labels.flip(-1), classes).float()


def loss_and_grad(objective, z: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's per-head loss on logits ``z`` and its gradient w.r.t. them."""
    z = z.clone().requires_grad_()
    out = objective(z, targets)
    out.loss.backward()
    return out.per_head, z.grad


# ---------------------------------------------------------------------------- cross entropy

@pytest.mark.parametrize("per_head", [False, True], ids=["[B,C]", "[H,B,C]"])
def test_soft_cross_entropy_is_the_labels_one_for_one_hot_and_the_hand_formula_smoothed(
        per_head: bool) -> None:
    z, y = random_logits(h=3, b=4, c=5)
    y = y.expand(3, 4).clone() if per_head else y
    z = z.requires_grad_()

    def ce(targets: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        loss = cross_entropy_per_head(z, targets, label_smoothing=eps)
        return loss, torch.autograd.grad(loss.sum(), z)[0]

    hard, hard_grad = ce(y)
    one_hot, one_hot_grad = ce(F.one_hot(y, 5).float())
    assert torch.equal(one_hot, hard) and torch.equal(one_hot_grad, hard_grad)

    log_p = torch.log_softmax(z.detach().double(), -1)
    right = log_p.gather(-1, y.expand(3, 4).unsqueeze(-1)).squeeze(-1)
    formula = ((1 - EPS) * -right + EPS * -log_p.mean(-1)).mean(-1)  # per head
    soft, soft_grad = ce(smoothed(y, 5).float())
    torch.testing.assert_close(soft.double(), formula, atol=1e-6, rtol=1e-6)
    smooth, smooth_grad = ce(y, EPS)
    torch.testing.assert_close(soft, smooth, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(soft_grad, smooth_grad, atol=1e-6, rtol=1e-6)

    # label_smoothing smooths soft targets too: t -> (1 - eps) t + eps / C
    t = mixed(y, 5)
    torch.testing.assert_close(ce(t, EPS)[0], ce((1 - EPS) * t + EPS / 5)[0], atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("shape", [(4,), (4, 6), (2, 4, 5), (4, 4, 5), (1, 3, 4, 5)])
def test_forward_refuses_soft_targets_of_another_shape_in_one_line(shape) -> None:
    z, _ = random_logits(h=3, b=4, c=5)
    with pytest.raises(UserError, match=r"^soft targets must be \[B, C\] or \[H, B, C\] with "
                                        r"H=3, B=4, C=5, got shape") as err:
        build_objective("single")(z, torch.full(shape, 0.2))
    assert "\n" not in str(err.value)


def test_hard_labels_keep_their_shapes_message() -> None:
    z, y = random_logits(h=3, b=4, c=5)
    with pytest.raises(UserError, match=r"^labels must be \[B\] or \[H, B\]"):
        build_objective("single")(z, y[:3])


# ---------------------------------------------------------------------------- end to end

def test_smoothed_targets_train_single_as_label_smoothing_trains_the_labels() -> None:
    z, y = random_logits(h=3, b=4, c=5)
    soft, soft_grad = loss_and_grad(build_objective("single"), z, smoothed(y, 5).float())
    smooth, smooth_grad = loss_and_grad(build_objective("label_smoothing", smoothing=EPS), z, y)
    torch.testing.assert_close(soft, smooth, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(soft_grad, smooth_grad, atol=1e-6, rtol=1e-6)


def test_consensus_with_smoothed_targets_differs_by_the_label_terms_smoothing_only() -> None:
    z, y = random_logits(h=3, b=4, c=5, seed=1)
    beta = 0.3
    objective = build_objective("consensus", beta=beta)
    soft = objective(z, smoothed(y, 5).float()).per_head.double()
    hard = objective(z, y).per_head.double()
    log_p = torch.log_softmax(z.double(), -1)
    ce = -log_p.gather(-1, y.expand(3, 4).unsqueeze(-1)).squeeze(-1).mean(-1)
    uniform = -log_p.mean(-1).mean(-1)  # CE against eps / C's uniform target
    torch.testing.assert_close(soft, hard + beta * EPS * (uniform - ce), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- KDCL

def test_kdcl_minlogit_refuses_soft_targets_and_the_other_targets_take_them() -> None:
    z, y = random_logits(h=3, b=4, c=5)
    minlogit = EnsembleTargetLoss("minlogit")
    problem = minlogit.soft_target_problem()
    assert "'minlogit'" in problem and "naive, linear or general" in problem
    assert "\n" not in problem
    with pytest.raises(UserError, match="takes no soft targets.*'minlogit'"):
        minlogit(z, mixed(y, 5))
    assert torch.isfinite(minlogit(z, y).loss)
    for target in ("naive", "linear", "general"):
        assert EnsembleTargetLoss(target).soft_target_problem() is None


@pytest.mark.parametrize("target", ["naive", "linear"])
def test_kdcl_targets_of_one_hot_targets_are_the_labels_ones(target: str) -> None:
    z, y = random_logits(h=3, b=6, c=4, seed=2)
    one_hot = F.one_hot(y, 4).float()
    assert torch.equal(naive_logits(z, one_hot), naive_logits(z, y))
    assert torch.equal(linear_weights(z, one_hot), linear_weights(z, y))
    soft, soft_grad = loss_and_grad(EnsembleTargetLoss(target), z, one_hot)
    hard, hard_grad = loss_and_grad(EnsembleTargetLoss(target), z, y)
    assert torch.equal(soft, hard) and torch.equal(soft_grad, hard_grad)


def _soft_ce(z: list[float], t: list[float]) -> float:
    lse = math.log(sum(math.exp(v) for v in z))
    return -sum(tc * (zc - lse) for tc, zc in zip(t, z))


def test_kdcl_naive_and_linear_minimise_the_soft_cross_entropy_of_each_example() -> None:
    z, y = random_logits(h=3, b=6, c=4, seed=3)
    t = mixed(y, 4)
    zl, tl = z.double().tolist(), t.double().tolist()
    chosen = naive_logits(z, t)
    w = linear_weights(z, t)
    assert torch.all(w >= 0) and (w.sum(-1) - 1).abs().max() < 1e-12
    n = 40
    for b in range(6):
        best = min(range(3), key=lambda k: _soft_ce(zl[k][b], tl[b]))
        assert torch.equal(chosen[b], z[best, b]), b

        def f(weights: list[float]) -> float:
            return _soft_ce([sum(weights[k] * zl[k][b][c] for k in range(3)) for c in range(4)],
                            tl[b])
        grid = min(f([i / n, j / n, (n - i - j) / n])
                   for i in range(n + 1) for j in range(n + 1 - i))
        assert f(w[b].tolist()) <= grid + 1e-12, b


# ---------------------------------------------------------------------------- intra

def test_intra_local_losses_take_soft_targets() -> None:
    g = torch.Generator().manual_seed(4)
    local = [torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)]
    out, y = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 1])
    hard = mid_losses(local, out, y, 2.0)
    one_hot = mid_losses(local, out, F.one_hot(y, 3).float(), 2.0)
    assert all(torch.equal(a, b) for a, b in zip(one_hot, hard))
    t = mixed(y, 3)
    log_p = torch.log_softmax(torch.stack(local) / 2.0, -1)
    torch.testing.assert_close(mid_losses(local, out, t, 2.0)[0],
                               -(log_p * t).sum(-1).mean(-1))

    projected = torch.randn(4, 3, 5, 5, generator=g)
    x = torch.randn(4, 3, 8, 8, generator=g)
    args = ([0.7], [0.2])
    hard = pull_push_losses([projected], x, y, 3, *args)
    assert torch.equal(pull_push_losses([projected], x, F.one_hot(y, 3).float(), 3, *args), hard)
    # a smoothed target's eps / C is the same for every example: S's centring removes it
    torch.testing.assert_close(
        pull_push_losses([projected], x, smoothed(y, 3).float(), 3, *args), hard)
    s = similarity(projected.flatten(2).std(-1, unbiased=False))
    s_x = similarity(x.flatten(2).std(-1, unbiased=False))
    expected = 0.7 * (s - similarity(t)).norm() - 0.2 * (s - s_x).norm()
    torch.testing.assert_close(pull_push_losses([projected], x, t, 3, *args)[0], expected)
