"""Intra-model collaboration's losses so far (paper 004): L_out over dropout views (eq. 4)
against a hand computation, kernel decorrelation (eq. 10) on known kernels, the kernel layers'
choice and bad names, and a dropout-view run through the engine: resumed bit-exactly (dropout
masks included) and exported strictly with the trained network's eval logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import collabsurgery as cs
from collabsurgery import engine
from collabsurgery.cli import main
from collabsurgery.errors import UserError
from collabsurgery.graphs import build_graph
from collabsurgery.objectives import IntraModelLoss, build_objective
from collabsurgery.objectives.base import Step
from collabsurgery.objectives.intra import kernel_decorrelation
from collabsurgery.recipe import load_recipe
from collabsurgery.runs import load_run
from conftest import (assert_same_logits, assert_same_weights, latest_weights, make_input,
                      stop_then_resume)
from test_objectives import _log_softmax, _softmax
from test_peer_objectives import _data

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


@pytest.mark.parametrize("alpha, t", [(0.5, 2.0), (0.2, 1.0)])
def test_l_out_matches_a_hand_computation(alpha: float, t: float) -> None:
    z, y = _data(h=4, b=3, c=5)
    out = IntraModelLoss(alpha_out=alpha, temperature=t)(z, y, Step())
    zs = z.tolist()
    for i in range(4):
        hard = soft = 0.0
        for b in range(3):
            others = [sum(zs[j][b][c] for j in range(4) if j != i) / 3 for c in range(5)]
            q = _softmax(others, t)
            soft -= sum(qc * lp for qc, lp in zip(q, _log_softmax(zs[i][b], t))) / 3
            hard -= _log_softmax(zs[i][b])[y[b]] / 3
        assert out.per_head[i].item() == pytest.approx(alpha * hard + (1 - alpha) * soft,
                                                       rel=1e-5)


def test_kernel_decorrelation_of_known_kernels() -> None:
    same = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])  # two equal filters: C = [[1, 1], [1, 1]]
    assert kernel_decorrelation(same.view(2, 3, 1, 1)).item() == pytest.approx(math.sqrt(2))
    opposite = torch.tensor([[1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])  # orthogonal after centring
    assert kernel_decorrelation(opposite.view(2, 1, 3, 1)).item() == pytest.approx(0.0, abs=1e-6)
    w = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    rows = [r.tolist() for r in w.flatten(1)]
    std_rows = []
    for r in rows:
        m = sum(r) / len(r)
        s = math.sqrt(sum((v - m) ** 2 for v in r) / len(r))
        std_rows.append([(v - m) / s for v in r])
    off = sum((sum(a * b for a, b in zip(std_rows[i], std_rows[j])) / 8) ** 2
              for i in range(3) for j in range(3) if i != j)
    assert kernel_decorrelation(w).item() == pytest.approx(math.sqrt(off), rel=1e-5)


def test_kernel_layers_default_to_the_last_two_stages_and_bad_names_are_refused() -> None:
    graph = build_graph("dropout", "cifar_resnet20", input_size=(3, 16, 16))
    obj = build_objective("intra", kernel_weight=1.0)
    obj.attach(graph)
    convs = [m for n, m in graph.stages[0][0].named_modules()
             if n.startswith(("layer2", "layer3")) and isinstance(m, torch.nn.Conv2d)]
    assert len(obj.convolutions) == len(convs) > 0
    assert all(any(c is k for k in convs) for c in obj.convolutions)
    assert obj.kernel_share == pytest.approx(1.0)  # 1 / (2 views x loss weight 1/2)
    for layers, match in ((["layer9"], "'layer9' is not a module"),
                          (["global_pool"], "'global_pool' holds no convolution")):
        with pytest.raises(UserError, match=match):
            build_objective("intra", kernel_weight=1.0, kernel_layers=layers).attach(graph)
    for kwargs, match in (({"kernel_weight": -1}, "kernel_weight"), ({"out_weight": -0.1},
                          "out_weight"), ({"alpha_out": 2}, "alpha_out")):
        with pytest.raises(UserError, match=match):
            build_objective("intra", **kwargs)


def test_kernel_loss_trains_only_the_chosen_convolutions() -> None:
    graph = build_graph("dropout", "cifar_resnet20", input_size=(3, 16, 16))
    obj = build_objective("intra", out_weight=0.0, kernel_weight=1.0, kernel_layers=["layer3"])
    obj.attach(graph)
    out = obj(graph.run(make_input(2, 16)), torch.zeros(2, dtype=torch.long), Step())
    (out.loss * graph.loss_weight).backward()
    for name, p in graph.stages[0][0].named_parameters():
        chosen = name.startswith("layer3") and p.dim() == 4
        assert (p.grad is not None and p.grad.abs().sum() > 0) == chosen, name


def test_dropout_views_train_resume_bit_exactly_and_export_equal(tmp_path, capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(REPO / "recipes" / "demo.yaml", [
            "graph={pattern: dropout, split: [layer2, global_pool], samples: 2}",
            "objective={name: intra, kernel_weight: 0.01}", "data.image_size=16",
            "data.max_train_examples=64", "train.batch_size=16", "train.epochs=2",
            "run.progress=false", f"run.dir={tmp_path}", f"run.name={name}", *more])

    straight = engine.train(recipe("straight"))
    stop_then_resume(lambda *more: recipe("resumed", *more), tmp_path / "resumed", 6, capsys)
    a, b = (latest_weights(d) for d in (straight, tmp_path / "resumed"))
    assert_same_weights(a, b)
    out = tmp_path / "net.safetensors"
    assert main(["export", str(straight), "-o", str(out)]) == 0
    graph, _ = load_run(straight)
    x = make_input(3, 16, seed=2)
    with torch.no_grad():
        assert_same_logits(cs.load_backbone(out)(x), graph(x)[0])


def test_demo_recipe_loads() -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-intra.yaml")
    assert recipe.graph.pattern == "dropout" and recipe.objective.name == "intra"
    assert recipe.graph.args["samples"] == 2 and len(recipe.graph.args["split"]) == 2
    assert recipe.objective.args["alpha_out"] == 0.5 and recipe.objective.args["temperature"] == 2.0
