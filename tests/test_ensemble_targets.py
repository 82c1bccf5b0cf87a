"""KDCL (Guo et al. 2020): its three ensemble targets and its loss against hand computations
(plain Python loops), the detached target, bad arguments, and a peer group of three
architectures trained through the engine with each target."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from collabsurgery import checkpoint, engine
from collabsurgery.errors import UserError
from collabsurgery.objectives import EnsembleTargetLoss, build_objective
from collabsurgery.objectives.ensemble import (general_weights, linear_weights, minlogit_logits,
                                               naive_logits, project_to_simplex)
from collabsurgery.recipe import load_recipe
from collabsurgery.runs import load_run
from conftest import stop_then_resume
from test_objectives import _log_softmax, _softmax
from test_peer_objectives import _data, _kl

REPO = Path(__file__).resolve().parents[1]
LOGIT_TARGETS = ["naive", "linear", "minlogit"]  # built from logits; general from probabilities
TARGETS = [*LOGIT_TARGETS, "general"]
Nested = list[list[list[float]]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _forget_accelerate_state():
    """Leave no mixed-precision setting behind in Accelerate's process-wide state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _ce(z: list[float], y: int) -> float:
    return -_log_softmax(z)[y]


def _batch_ce(zk: list[list[float]], y: list[int]) -> float:
    return sum(_ce(zb, yb) for zb, yb in zip(zk, y)) / len(y)


def _mix(z: Nested, w: list[float]) -> list[list[float]]:
    """``sum_k w_k z_k`` with loops."""
    return [[sum(w[k] * z[k][b][c] for k in range(len(z))) for c in range(len(z[0][b]))]
            for b in range(len(z[0]))]


# ---------------------------------------------------------------------------- targets

def ref_minlogit(z: Nested, y: list[int]) -> list[list[float]]:
    out = []
    for b in range(len(y)):
        out.append([min(z[k][b][c] - z[k][b][y[b]] for k in range(len(z)))
                    for c in range(len(z[0][b]))])
    return out


def ref_naive(z: Nested, y: list[int]) -> list[list[float]]:
    ces = [_batch_ce(zk, y) for zk in z]
    return z[ces.index(min(ces))]


def test_minlogit_matches_loops() -> None:
    z = torch.tensor([[[1.0, 3.0, -2.0, 0.5], [0.0, 0.0, 4.0, 1.0]],
                      [[2.0, 1.0, 0.0, 3.0], [-1.0, 2.0, 2.0, 0.0]],
                      [[0.0, 5.0, 1.0, 1.0], [3.0, -2.0, 1.0, 1.0]]])
    y = torch.tensor([1, 2])
    got = minlogit_logits(z, y)
    expected = ref_minlogit(z.tolist(), y.tolist())
    # by hand, example 0 class 0: min(1-3, 2-1, 0-5) = -5
    assert expected[0][0] == -5.0
    torch.testing.assert_close(got, torch.tensor(expected))
    assert torch.all(got[torch.arange(2), y] == 0)  # the right class is 0 for every student
    zr, yr = _data(h=4, b=6, c=7, seed=3)
    torch.testing.assert_close(minlogit_logits(zr, yr), torch.tensor(ref_minlogit(zr.tolist(),
                                                                                   yr.tolist())))


def test_naive_takes_the_student_with_the_lowest_ce() -> None:
    for seed in range(5):
        z, y = _data(h=3, b=5, c=4, seed=seed)
        ces = [_batch_ce(zk, y.tolist()) for zk in z.tolist()]
        assert torch.equal(naive_logits(z, y), z[ces.index(min(ces))])
    # student 2 is right on every example, the others wrong
    z = torch.zeros(3, 2, 3)
    z[0, :, 2] = z[1, :, 1] = 3.0
    z[2, torch.arange(2), torch.tensor([0, 0])] = 3.0
    assert torch.equal(naive_logits(z, torch.tensor([0, 0])), z[2])


def test_project_to_simplex() -> None:
    v = torch.tensor([[0.5, 0.5, 0.0], [2.0, 0.0, 0.0], [0.2, 0.1, -5.0], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    expected = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.55, 0.45, 0.0],
                             [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(project_to_simplex(v), expected)


def test_linear_puts_all_weight_on_the_one_right_student() -> None:
    z, y = torch.zeros(3, 4, 5), torch.tensor([0, 1, 2, 3])
    z[1, torch.arange(4), y] = 4.0  # right
    z[0, torch.arange(4), (y + 1) % 5] = 4.0  # wrong
    z[2, torch.arange(4), (y + 2) % 5] = 2.0  # wrong
    w = linear_weights(z, y)
    assert w.dtype == torch.float64 and w.shape == (3,)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def _f(z: Nested, y: list[int], w: list[float]) -> float:
    return _batch_ce(_mix(z, w), y)


def test_linear_interior_optimum_of_two_students_by_ternary_search() -> None:
    # each student is right on the example the other gets wrong: the optimum is interior
    z = [[[2.0, 0.0, 0.5], [1.5, 0.0, 0.0], [0.0, 1.0, 0.0]],
         [[0.0, 1.0, 0.0], [0.0, 3.0, 0.5], [0.0, 2.0, 0.0]]]
    y = [0, 1, 1]
    lo, hi = 0.0, 1.0
    for _ in range(200):  # f is convex in the weight of student 0
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if _f(z, y, [a, 1 - a]) < _f(z, y, [b, 1 - b]):
            hi = b
        else:
            lo = a
    best = (lo + hi) / 2
    assert 0.05 < best < 0.95
    w = linear_weights(torch.tensor(z), torch.tensor(y))
    torch.testing.assert_close(w, torch.tensor([best, 1 - best], dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_weights_beat_a_simplex_grid(seed: int) -> None:
    z, y = _data(h=3, b=6, c=4, seed=seed)
    w = linear_weights(z, y)
    assert torch.all(w >= 0) and abs(w.sum().item() - 1) < 1e-12
    zl, yl = z.double().tolist(), y.tolist()
    n = 40
    grid = min(_f(zl, yl, [i / n, j / n, (n - i - j) / n])
               for i in range(n + 1) for j in range(n + 1 - i))
    assert _f(zl, yl, w.tolist()) <= grid + 1e-12


# ---------------------------------------------------------------------------- the loss

def ref_target(name: str, z: torch.Tensor, y: torch.Tensor) -> list[list[float]]:
    zl, yl = z.double().tolist(), y.tolist()
    if name == "naive":
        return ref_naive(zl, yl)
    if name == "minlogit":
        return ref_minlogit(zl, yl)
    return _mix(zl, linear_weights(z, y).tolist())  # the weights are checked above


def ref_kdcl(z: torch.Tensor, y: torch.Tensor, zt: list[list[float]], t: float
             ) -> list[tuple[float, float]]:
    """Per student (CE, T^2 KL(softmax(z_t / T) || softmax(z_k / T))) with loops."""
    zl, yl = z.double().tolist(), y.tolist()
    out = []
    for zk in zl:
        soft = sum(_kl(_softmax(zt[b], t), _log_softmax(zk[b], t)) for b in range(len(yl)))
        out.append((_batch_ce(zk, yl), t * t * soft / len(yl)))
    return out


@pytest.mark.parametrize("target", LOGIT_TARGETS)
@pytest.mark.parametrize("t,lam", [(2.0, 1.0), (1.0, 0.5), (4.0, 3.0)])
def test_loss_matches_loop_reference(target: str, t: float, lam: float) -> None:
    z, y = _data(h=3, b=4, c=5, seed=4)
    out = EnsembleTargetLoss(target=target, temperature=t, weight=lam)(z, y)
    ref = ref_kdcl(z, y, ref_target(target, z, y), t)
    torch.testing.assert_close(out.per_head, torch.tensor([h + lam * s for h, s in ref]))
    torch.testing.assert_close(out.parts["hard"], torch.tensor(sum(h for h, _ in ref)))
    torch.testing.assert_close(out.parts["soft"], torch.tensor(sum(s for _, s in ref)))
    assert out.loss.dim() == 0 and not out.per_head.requires_grad


@pytest.mark.parametrize("target", LOGIT_TARGETS)
def test_gradient_is_the_hand_formula_with_the_target_held_fixed(target: str) -> None:
    z, y = _data(h=3, b=4, c=5, seed=6)
    t, lam, (k_n, b_n, c) = 2.0, 0.7, z.shape
    zg = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(EnsembleTargetLoss(target, t, lam)(zg, y).loss, zg)
    p_t = torch.softmax(torch.tensor(ref_target(target, z, y), dtype=torch.float32) / t, -1)
    onehot = F.one_hot(y, c).float()
    # d/dz_k of CE + lambda T^2 KL(p_t || softmax(z_k/T)) = p_k - onehot + lambda T (q_k - p_t)
    expected = torch.stack([(torch.softmax(z[k], -1) - onehot
                             + lam * t * (torch.softmax(z[k] / t, -1) - p_t)) / b_n
                            for k in range(k_n)])
    torch.testing.assert_close(g, expected)
    for k in range(k_n):  # student k's loss moves only z_k
        zg = z.clone().requires_grad_(True)
        per_head, _ = EnsembleTargetLoss(target, t, lam).head_losses(zg, y.expand(k_n, b_n), None)
        (gk,) = torch.autograd.grad(per_head[k], zg)
        others = [j for j in range(k_n) if j != k]
        assert torch.count_nonzero(gk[others]) == 0 and torch.count_nonzero(gk[k]) > 0


def test_defaults_are_the_papers_cifar_setting() -> None:
    obj = build_objective("kdcl")
    assert isinstance(obj, EnsembleTargetLoss)
    assert (obj.target, obj.temperature, obj.weight) == ("minlogit", 2.0, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "mean"}, r"target must be one of general, linear, minlogit, naive, got 'mean'"),
    ({"target": ["naive"]}, r"target must be one of general, linear, minlogit, naive"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": -1.0}, "temperature must be a number > 0"),
    ({"temperature": float("nan")}, "temperature must be a number > 0"),
    ({"temperature": "2"}, "temperature must be a number > 0"),
    ({"weight": -0.5}, "weight must be a number >= 0"),
    ({"weight": True}, "weight must be a number >= 0"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        build_objective("kdcl", **kwargs)


def test_bad_input_and_bf16() -> None:
    z, y = _data(h=1)
    with pytest.raises(UserError, match="at least 2 heads"):
        EnsembleTargetLoss()(z, y)
    z, _ = _data(h=2, b=3)
    with pytest.raises(UserError, match="same examples"):
        EnsembleTargetLoss()(z, torch.tensor([[0, 1, 2], [0, 1, 3]]))
    same = EnsembleTargetLoss()(z, torch.tensor([[0, 1, 2], [0, 1, 2]])).loss
    torch.testing.assert_close(same, EnsembleTargetLoss()(z, torch.tensor([0, 1, 2])).loss)
    for target in TARGETS:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = EnsembleTargetLoss(target)(_data()[0].bfloat16(), _data()[1])
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------- general

def _holdout(right_probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class hold-out logits whose right-class (class 0) probability is ``right_probs[k][n]``
    for student k on example n (1.0 through a logit gap of 100)."""
    p = torch.tensor(right_probs, dtype=torch.float64)
    logits = torch.stack([p.clamp_max(1 - 1e-300).log(), (1 - p).clamp_min(1e-44).log()], -1)
    return logits, torch.zeros(p.shape[1], dtype=torch.long)


def test_general_weights_from_a_known_covariance() -> None:
    # errors f - 1: student 0 (-0.1, 0), student 1 (0, -0.2): C = diag(0.005, 0.02), so eq. 11
    # gives w = (1/0.005, 1/0.02) / (200 + 50) = (0.8, 0.2)
    w = general_weights(*_holdout([[0.9, 1.0], [1.0, 0.8]]))
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64), atol=1e-5, rtol=0)


def test_general_weights_are_projected_when_eq_11_goes_negative() -> None:
    # errors (-0.1, -0.1) and (-0.2, -0.3): C = [[0.01, 0.025], [0.025, 0.065]], det 2.5e-5;
    # C^-1 1 = (0.065 - 0.025, 0.01 - 0.025) / det = (1600, -600), eq. 11: (1.6, -0.6)
    raw_first = (0.065 - 0.025) / ((0.065 - 0.025) + (0.01 - 0.025))
    assert raw_first == pytest.approx(1.6) and raw_first > 1
    w = general_weights(*_holdout([[0.9, 0.9], [0.8, 0.7]]))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-6, rtol=0)


def test_general_weights_of_identical_students_are_equal_despite_a_singular_covariance() -> None:
    w = general_weights(*_holdout([[0.9, 0.6, 0.7]] * 3))
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_general_target_is_the_weighted_mean_of_probabilities() -> None:
    z, y = _data(h=3, b=4, c=5)
    loss = EnsembleTargetLoss("general", temperature=2.0, weight=0.5)
    loss.check_compatible(3, 5)
    assert torch.equal(loss.general_weights, torch.full((3,), 1 / 3))  # before any update
    holdout, labels = _data(h=3, b=30, c=5, seed=1)
    loss.end_epoch(holdout, labels)
    w = general_weights(holdout, labels).float()
    torch.testing.assert_close(loss.general_weights, w)
    zs, ys = z.tolist(), y.tolist()
    for k in range(3):
        target = [sum(w[j].item() * _softmax(zs[j][b], 2.0)[c] for j in range(3))
                  for b in range(4) for c in range(5)]
        target = [target[b * 5:(b + 1) * 5] for b in range(4)]
        soft = sum(_kl(target[b], _log_softmax(zs[k][b], 2.0)) for b in range(4)) / 4 * 4.0
        hard = sum(_ce(zs[k][b], ys[b]) for b in range(4)) / 4
        assert loss(z, y).per_head[k].item() == pytest.approx(hard + 0.5 * soft, rel=1e-5)


# ---------------------------------------------------------------------------- engine

THREE = "model.name=[cifar_resnet20, cifar_wrn16_2, torchvision.mobilenet_v3_small]"


@pytest.mark.parametrize("target", TARGETS)
def test_peer_group_of_three_architectures_trains(tmp_path, target: str) -> None:
    recipe = load_recipe(None, [
        # 32 examples in batches of 16: one epoch of two steps, a checkpoint after each
        "data.image_size=16", "data.max_train_examples=32", "train.batch_size=16",
        "run.progress=false", "train.epochs=1", "run.checkpoint_every=1",
        "graph={pattern: peers}", THREE, f"objective={{name: kdcl, target: {target}}}",
        f"run.dir={tmp_path}", "run.name=kdcl"])
    run_dir = engine.train(recipe)
    (record,) = engine.history_of(run_dir)
    assert record["step"] == 2 and math.isfinite(record["train_loss"])
    ckpts = run_dir / "checkpoints"
    before = load_file(str(ckpts / "ckpt-00000001" / "model.safetensors"))
    after = load_file(str(ckpts / "ckpt-00000002" / "model.safetensors"))
    graph, _ = load_run(run_dir)
    assert graph.num_heads == 3
    for k, student in enumerate(graph.students):
        names = [f"graph.students.{k}.{n}" for n, _ in student.named_parameters()]
        assert names and all(not torch.equal(before[n], after[n]) for n in names), k


def test_demo_recipe_loads() -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-kdcl.yaml")
    assert recipe.name == "demo-kdcl" and recipe.objective.name == "kdcl"
    assert recipe.objective.args == {"target": "minlogit", "temperature": 2.0, "weight": 1.0}
    assert len(recipe.model.name) == 2 and len(set(recipe.model.name)) == 2


def test_general_weights_update_each_epoch_are_checkpointed_and_resume_bit_exactly(
        tmp_path, capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(None, [
            "data.image_size=16", "data.max_train_examples=64", "train.batch_size=16",
            "run.progress=false", "train.epochs=2", "graph={pattern: peers}",
            "model.name=[cifar_resnet20, cifar_wrn16_2]", "model.kwargs={drop_rate: 0.2}",
            "objective={name: kdcl, target: general}", f"run.dir={tmp_path}",
            f"run.name={name}", *more])

    straight = engine.train(recipe("straight"))
    stop_then_resume(lambda *more: recipe("resumed", *more), tmp_path / "resumed", 6, capsys)
    a, b = (load_file(str(checkpoint.latest(d / "checkpoints") / "model.safetensors"))
            for d in (straight, tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = a["objective.general_weights"]
    assert weights.shape == (2,) and weights.sum().item() == pytest.approx(1.0)
    assert not torch.equal(weights, torch.full((2,), 0.5))  # updated from the hold-out split
