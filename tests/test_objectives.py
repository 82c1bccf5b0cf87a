"""Objectives against hand-computed references (explicit loops, not the library's code)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from collabsurgery.common.arguments import declarations
from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.objectives import (OBJECTIVES, ConsensusLoss, LabelSmoothingLoss, LossContext,
                                      LossOutput, PeerAttentionLoss, SingleLoss, Step,
                                      build_objective)

from helpers import random_logits, ref_log_softmax, ref_softmax


def ref_consensus(logits: torch.Tensor, labels: torch.Tensor, t: float, beta: float) -> list[float]:
    """Per-head CL-ILR loss with plain Python loops."""
    z = logits.double().tolist()
    y = labels.tolist()
    h_n, b_n, c_n = len(z), len(z[0]), len(z[0][0])
    out = []
    for h in range(h_n):
        hard = soft = 0.0
        for b in range(b_n):
            mean_others = [
                sum(z[j][b][i] for j in range(h_n) if j != h) / (h_n - 1) for i in range(c_n)
            ]
            q = ref_softmax(mean_others, t)
            hard += -ref_log_softmax(z[h][b])[y[b]]
            soft += -sum(qi * li for qi, li in zip(q, ref_log_softmax(z[h][b], t)))
        out.append(beta * hard / b_n + (1 - beta) * t * t * soft / b_n)
    return out


@pytest.mark.parametrize("t,beta", [(1.0, 0.5), (2.0, 0.5), (3.0, 0.2), (2.0, 1.0)])
def test_consensus_matches_loop_reference(t: float, beta: float) -> None:
    z, y = random_logits()
    out = ConsensusLoss(temperature=t, beta=beta)(z, y)
    assert isinstance(out, LossOutput)
    ref = ref_consensus(z, y, t, beta)
    torch.testing.assert_close(out.per_head, torch.tensor(ref, dtype=torch.float32))
    torch.testing.assert_close(out.loss, torch.tensor(sum(ref), dtype=torch.float32))
    torch.testing.assert_close(out.per_head.sum(), out.loss.detach())
    assert not out.per_head.requires_grad and out.loss.dim() == 0
    torch.testing.assert_close(beta * out.parts["hard"] + (1 - beta) * out.parts["soft"], out.loss)


def test_t_squared_factor_on_hand_values() -> None:
    # Two heads, one example, two classes: z0 = [0, 0], z1 = [2, 0]; beta = 0 (soft only).
    z = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    y = torch.tensor([0])
    for t in (1.0, 2.0):
        q0 = [math.exp(2 / t) / (math.exp(2 / t) + 1), 1 / (math.exp(2 / t) + 1)]  # from z1
        head0 = -(q0[0] + q0[1]) * math.log(0.5)  # z0 / T is uniform
        p1 = q0  # head 1's own softmax(z1 / T)
        head1 = -(0.5 * math.log(p1[0]) + 0.5 * math.log(p1[1]))  # q1 = softmax(z0 / T)
        out = ConsensusLoss(temperature=t, beta=0.0)(z, y)
        expected = torch.tensor([t * t * head0, t * t * head1])
        torch.testing.assert_close(out.per_head, expected)
    # Head 0 at T=2 is exactly 4 * log 2 (T^2 * uniform CE), vs log 2 at T=1.
    assert ConsensusLoss(2.0, 0.0)(z, y).per_head[0].item() == pytest.approx(4 * math.log(2))
    assert ConsensusLoss(1.0, 0.0)(z, y).per_head[0].item() == pytest.approx(math.log(2))


def _soft_target(loss: ConsensusLoss, z: torch.Tensor, y: torch.Tensor, h: int) -> torch.Tensor:
    """Recover q_h from the gradient formula: d soft_h / d z_h = T (p_h - q_h) / B."""
    z = z.clone().requires_grad_(True)
    out = loss(z, y)
    (g,) = torch.autograd.grad(out.loss, z)
    # with beta = 0, dL/dz_h = T * (softmax(z_h / T) - q_h) / B  (q is detached)
    t, b = loss.temperature, z.shape[1]
    return torch.softmax(z[h].detach() / t, -1) - g[h] * b / t


def test_self_excluded_from_consensus() -> None:
    z, y = random_logits(h=3)
    loss = ConsensusLoss(temperature=2.0, beta=0.0)
    q0 = _soft_target(loss, z, y, 0)
    g = torch.Generator().manual_seed(1)
    z_self = z.clone()
    z_self[0] += torch.randn(z.shape[1:], generator=g) * 5
    torch.testing.assert_close(_soft_target(loss, z_self, y, 0), q0, atol=1e-5, rtol=1e-5)
    z_other = z.clone()
    z_other[2] += torch.randn(z.shape[1:], generator=g) * 5
    assert not torch.allclose(_soft_target(loss, z_other, y, 0), q0, atol=1e-3)


def test_consensus_averages_logits_not_probabilities() -> None:
    # Three heads, one example; head 0's consensus is from heads 1 and 2.
    z = torch.tensor([[[0.0, 0.0, 0.0]], [[4.0, 0.0, 0.0]], [[0.0, 0.0, 8.0]]])
    y = torch.tensor([0])
    t = 2.0
    loss = ConsensusLoss(temperature=t, beta=0.0)
    q0 = _soft_target(loss, z, y, 0)
    logit_mean = ref_softmax([2.0, 0.0, 4.0], t)
    p1, p2 = ref_softmax([4.0, 0.0, 0.0], t), ref_softmax([0.0, 0.0, 8.0], t)
    prob_mean = [(a + b) / 2 for a, b in zip(p1, p2)]
    torch.testing.assert_close(q0[0], torch.tensor(logit_mean), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q0[0], torch.tensor(prob_mean), atol=1e-2)
    # the loss value itself: head 0 is uniform at T, so soft = T^2 * log 3
    assert loss(z, y).per_head[0].item() == pytest.approx(t * t * math.log(3), rel=1e-5)


def test_batchmean_reduction() -> None:
    z, y = random_logits(h=2, b=6, c=5)
    loss = ConsensusLoss(2.0, 0.5)
    full = loss(z, y).per_head
    singles = torch.stack([loss(z[:, i : i + 1], y[i : i + 1]).per_head for i in range(6)])
    torch.testing.assert_close(full, singles.mean(0))  # per-example mean, not sum
    # padding classes with very negative logits adds ~nothing: no division by C
    pad = torch.full((2, 6, 95), -1e4)
    torch.testing.assert_close(loss(torch.cat([z, pad], -1), y).per_head, full)
    # hand check with all-equal logits: hard = log C, soft = T^2 log C, independent of B
    for c in (2, 10):
        zc = torch.zeros(2, 3, c)
        expected = 0.5 * math.log(c) + 0.5 * 4 * math.log(c)
        got = loss(zc, torch.zeros(3, dtype=torch.long)).per_head
        torch.testing.assert_close(got, torch.full((2,), expected))


def test_gradient_matches_hand_formula_and_targets_detached() -> None:
    z, y = random_logits(h=3, b=4, c=5)
    t, beta = 2.0, 0.3
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ConsensusLoss(t, beta)(zg, y).loss, zg)
    h_n, b_n = z.shape[:2]
    onehot = F.one_hot(y, z.shape[2]).float()
    expected = torch.empty_like(z)
    for h in range(h_n):
        others = sum(z[j] for j in range(h_n) if j != h) / (h_n - 1)
        q = torch.softmax(others / t, -1)
        hard = beta * (torch.softmax(z[h], -1) - onehot) / b_n
        soft = (1 - beta) * t * (torch.softmax(z[h] / t, -1) - q) / b_n
        expected[h] = hard + soft
    torch.testing.assert_close(g, expected)
    # a single head's loss has no gradient w.r.t. the other heads' logits
    for h in range(h_n):
        zg = z.clone().requires_grad_(True)
        (gh,) = torch.autograd.grad(_head_loss(ConsensusLoss(t, beta), zg, y, h), zg)
        others = [j for j in range(h_n) if j != h]
        assert torch.count_nonzero(gh[others]) == 0 and torch.count_nonzero(gh[h]) > 0


def _head_loss(loss: ConsensusLoss, z: torch.Tensor, y: torch.Tensor, h: int) -> torch.Tensor:
    per_head, _ = loss.head_losses(z, y.expand(z.shape[0], -1), LossContext({}, Step()))
    return per_head[h]


def test_float32_under_bf16_autocast() -> None:
    z, y = random_logits(h=4, b=8, c=10)
    for obj in (ConsensusLoss(), SingleLoss(), LabelSmoothingLoss()):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = obj(z.bfloat16(), y)
        assert out.loss.dtype == torch.float32 and out.per_head.dtype == torch.float32
        assert torch.isfinite(out.loss) and torch.isfinite(out.per_head).all()
        ref = obj(z.bfloat16().float(), y)
        torch.testing.assert_close(out.per_head, ref.per_head)


def test_single_loss_is_sum_of_ce() -> None:
    z, y = random_logits(h=3)
    out = SingleLoss()(z, y)
    ref = []
    for h in range(3):
        ref.append(sum(-ref_log_softmax(z[h, b].tolist())[int(y[b])] for b in range(4)) / 4)
    torch.testing.assert_close(out.per_head, torch.tensor(ref))
    torch.testing.assert_close(out.loss, torch.tensor(sum(ref)))
    one = SingleLoss()(z[:1], y)  # H = 1 baseline
    torch.testing.assert_close(one.loss, F.cross_entropy(z[0], y))


def test_label_smoothing_matches_torch() -> None:
    z, y = random_logits(h=2, c=7)
    out = LabelSmoothingLoss(0.1)(z, y)
    ref = [F.cross_entropy(z[h], y, label_smoothing=0.1) for h in range(2)]
    torch.testing.assert_close(out.per_head, torch.stack(ref))
    torch.testing.assert_close(out.loss, sum(ref))
    # and by hand: (1 - eps) * CE(y) + eps * mean_i(-log p_i)
    hand = 0.0
    for b in range(4):
        lp = ref_log_softmax(z[0, b].tolist())
        hand += 0.9 * -lp[int(y[b])] + 0.1 * -sum(lp) / 7
    assert out.per_head[0].item() == pytest.approx(hand / 4, rel=1e-5)


def test_single_head_consensus_rejected() -> None:
    z, y = random_logits(h=1)
    with pytest.raises(ValueError, match="at least 2 heads"):
        ConsensusLoss()(z, y)


def test_build_objective() -> None:
    obj = build_objective("consensus", temperature=3.0, beta=0.7)
    assert isinstance(obj, ConsensusLoss) and obj.temperature == 3.0 and obj.beta == 0.7
    assert isinstance(build_objective("single"), SingleLoss)
    assert build_objective("label_smoothing", smoothing=0.2).smoothing == 0.2
    with pytest.raises(UserError, match="consensus.*label_smoothing.*single"):
        build_objective("consensu")
    with pytest.raises(UserError, match="objective 'consensus' takes no argument 'temprature'"):
        build_objective("consensus", temprature=2.0)
    with pytest.raises(UserError):
        ConsensusLoss(temperature=0.0)


def test_constructing_an_objective_checks_its_declaration() -> None:
    """Every argument is declared once, in the annotated constructor, with a description; a
    direct construction (keywords or positions) is checked against it as build_objective is."""
    for name, cls in OBJECTIVES.items():
        if cls.__module__.startswith("collabsurgery."):
            for arg, declared in declarations(cls).items():
                assert declared.description, f"objective '{name}': '{arg}' has no description"
    with pytest.raises(ArgumentError, match="^temperature must be a number > 0, got 0$"):
        PeerAttentionLoss(temperature=0)
    with pytest.raises(ArgumentError, match=r"^beta must be a number in \[0, 1\], got 2$"):
        ConsensusLoss(2.0, 2)
    with pytest.raises(ArgumentError, match="^ConsensusLoss takes no argument 'temprature' "
                                            "\\(did you mean 'temperature'\\?\\)"):
        ConsensusLoss(temprature=2.0)
    with pytest.raises(TypeError):  # Python's own complaint
        ConsensusLoss(2.0, 0.5, 1)
    obj = ConsensusLoss(3, "5e-1")  # the values the declaration gives: floats
    assert (obj.temperature, obj.beta) == (3.0, 0.5) and isinstance(obj.temperature, float)


def test_step_draws_depend_on_seed_epoch_batch_only() -> None:
    """Per-step random choices (sub-groups, routes) must be the same on every process and on a
    resumed run: they come from (seed, epoch, batch), never from the global RNG or the rank."""
    def draw(step: Step) -> torch.Tensor:
        return torch.rand(5, generator=step.generator("subgroup"))

    torch.manual_seed(1)
    first = draw(Step(seed=3, epoch=2, batch=7, epochs=10, batches=20))
    torch.manual_seed(2)  # another process or a resumed run has another global RNG state
    assert torch.equal(first, draw(Step(seed=3, epoch=2, batch=7, epochs=10, batches=20)))
    for other in (Step(3, 2, 8), Step(3, 1, 7), Step(4, 2, 7)):
        assert not torch.equal(first, draw(other))
    assert Step(0, 4, 10, epochs=10, batches=20).progress == pytest.approx(0.45)
