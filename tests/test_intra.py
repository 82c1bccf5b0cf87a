"""Intra-model collaboration's four losses (paper 004): L_out over dropout views (eq. 4), L_mid's
soft target (eq. 6), the similarity matrix S (eq. 8) and kernel decorrelation (eq. 10) against
hand computations; local losses train their own modules and their layer only; bad input; a
dropout-view run with every loss on through the engine: resumed bit-exactly (dropout masks
included) and exported strictly with the trained network's eval logits."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import collabsurgery as cs
from collabsurgery.cli import main
from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs import build_graph
from collabsurgery.objectives import IntraModelLoss, build_objective
from collabsurgery.objectives.base import Step
from collabsurgery.objectives.intra import kernel_decorrelation
from collabsurgery.objectives.local_losses import (depth_weights, mid_losses, pull_push_losses,
                                                   similarity)
from collabsurgery.train import engine

from helpers import (assert_same_logits, assert_same_weights, latest_weights, make_input,
                     random_logits, ref_log_softmax, ref_softmax, stop_then_resume)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


@pytest.mark.parametrize("alpha, t", [(0.5, 2.0), (0.2, 1.0)])
def test_l_out_matches_a_hand_computation(alpha: float, t: float) -> None:
    z, y = random_logits(h=4, b=3, c=5)
    out = IntraModelLoss(alpha_out=alpha, temperature=t)(z, y, Step())
    zs = z.tolist()
    for i in range(4):
        hard = soft = 0.0
        for b in range(3):
            others = [sum(zs[j][b][c] for j in range(4) if j != i) / 3 for c in range(5)]
            q = ref_softmax(others, t)
            soft -= sum(qc * lp for qc, lp in zip(q, ref_log_softmax(zs[i][b], t))) / 3
            hard -= ref_log_softmax(zs[i][b])[y[b]] / 3
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


#: paper 004 (section III-D): "use Lkernel only in the last two groups of convolutions for VGG-16
#: and ResNet-18"; VGG-16's groups end at its max pools (features.23 closes the third group,
#: then 512-channel convolutions 24, 27, 30 and 34, 37, 40), a ResNet's are its stages
LAST_TWO_GROUPS = {
    "cifar_vgg16": ["features.24", "features.27", "features.30", "features.34", "features.37",
                    "features.40"],
    "cifar_resnet18": ("layer3.", "layer4."),
    "cifar_resnet20": ("layer2.", "layer3."),  # three stages
}


@pytest.mark.parametrize("model, size", [("cifar_vgg16", 32), ("cifar_resnet18", 32),
                                         ("cifar_resnet20", 16)])
def test_kernel_layers_default_to_the_last_two_groups_of_convolutions(model, size) -> None:
    graph = build_graph("dropout", model, input_size=(3, size, size))
    obj = build_objective("intra", kernel_weight=1.0)
    obj.attach(graph)
    named = [(n, m) for n, m in graph.stages[0][0].named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    expected = LAST_TWO_GROUPS[model]
    chosen = [n for n, m in named if n in expected or n.startswith(tuple(expected))]
    assert [n for n, m in named if any(m is c for c in obj.convolutions)] == chosen
    assert len(obj.convolutions) == len(chosen) > 0 and len(chosen) < len(named)
    if model == "cifar_vgg16":
        assert (len(chosen), len(named)) == (6, 13)
        assert all(m.out_channels == 512 for n, m in named if n in chosen)


def test_kernel_layers_bad_names_are_refused() -> None:
    graph = build_graph("dropout", "cifar_resnet20", input_size=(3, 16, 16))
    obj = build_objective("intra", kernel_weight=1.0)
    obj.attach(graph)
    assert obj.share == pytest.approx(1.0)  # 1 / (2 views x loss weight 1/2)
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


def test_l_mid_soft_target_is_the_mean_of_that_layer_and_every_layer_above() -> None:
    z1, z2, out = (torch.tensor([[a, b, 0.0]]) for a, b in ((1.0, 2.0), (3.0, -1.0), (0.5, 0.5)))
    y, t = torch.tensor([1]), 2.0
    hard, soft = mid_losses([z1, z2], out, y, t)
    for i, (z, above) in enumerate(((z1, [z1, z2, out]), (z2, [z2, out]))):
        mean = [sum(a[0, c].item() for a in above) / len(above) for c in range(3)]
        q, log_p = ref_softmax(mean, t), ref_log_softmax(z[0].tolist(), t)
        assert soft[i].item() == pytest.approx(-sum(a * b for a, b in zip(q, log_p)), rel=1e-6)
        assert hard[i].item() == pytest.approx(-log_p[1], rel=1e-6)  # eq. 5: softmax at T


def test_similarity_matrix_of_a_small_batch() -> None:
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    centred = [[a - 2.0, b - 2.0] for a, b in z.tolist()]  # the batch mean is (2, 2)
    s = similarity(z)
    for i in range(3):
        for j in range(3):
            u, v = centred[i], centred[j]
            cos = (u[0] * v[0] + u[1] * v[1]) / math.hypot(*u) / math.hypot(*v)
            assert s[i, j].item() == pytest.approx(cos, abs=1e-6)
    labels = similarity(torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1]), 2))
    torch.testing.assert_close(labels, torch.tensor([[1.0, -1, 1, -1], [-1, 1, -1, 1]] * 2))


def test_pull_push_pulls_towards_the_labels_and_pushes_from_the_input() -> None:
    g = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 0, 2])
    s = similarity(g.flatten(2).std(-1, unbiased=False))
    s_y = similarity(torch.nn.functional.one_hot(y, 3))
    s_x = similarity(x.flatten(2).std(-1, unbiased=False))
    got = pull_push_losses([g], x, y, 3, [0.7], [0.2])
    assert got.item() == pytest.approx(0.7 * (s - s_y).norm().item()
                                       - 0.2 * (s - s_x).norm().item(), rel=1e-5)
    assert depth_weights((0.5, 1.0), 3) == [0.5, 0.75, 1.0]
    assert depth_weights((0.5, 0.1), 1) == [pytest.approx(0.3)]


def _local_graph():
    return build_graph("dropout", "cifar_resnet20", split="layer2,global_pool",
                       local="layer1,layer2", input_size=(3, 16, 16)).train()


@pytest.mark.parametrize("loss", ["mid_weight", "pull_push_weight"])
def test_local_losses_train_their_modules_and_their_layers_only(loss: str) -> None:
    graph = _local_graph()
    obj = build_objective("intra", out_weight=0.0, **{loss: 1.0})
    obj.attach(graph)
    out = obj(graph.run(make_input(4, 16), wants=obj.wants), torch.tensor([0, 1, 2, 0]),
              Step(), graph)
    (out.loss * graph.loss_weight).backward()
    for name, p in graph.named_parameters():  # the last block of layer1 and of layer2 only
        in_layer = ".layer1.2." in name or ".layer2.2." in name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == in_layer, name
    owned = list(obj.parameters())
    assert owned and all(p.grad is not None and p.grad.abs().sum() > 0 for p in owned)
    assert (obj.classifiers is None) == (loss != "mid_weight")  # only what is switched on
    assert (obj.projections is None) == (loss != "pull_push_weight")


_SWITCHES = ({"out_weight": 1.0}, {"mid_weight": 1.0}, {"pull_push_weight": 0.01},
             {"kernel_weight": 0.01})


@pytest.mark.parametrize("on", [on for on in itertools.product((0, 1), repeat=4) if any(on)])
def test_every_combination_trains_and_exports_strictly_equal(on, tmp_path) -> None:
    graph = _local_graph()
    weights = {"out_weight": 0.0}
    for switch, kwargs in zip(on, _SWITCHES):
        weights.update(kwargs if switch else {})
    obj = build_objective("intra", **weights)
    obj.attach(graph)
    params = [*graph.parameters(), *obj.parameters()]
    before = [p.detach().clone() for p in params]
    out = obj(graph.run(make_input(4, 16), wants=obj.wants), torch.tensor([0, 1, 2, 0]),
              Step(), graph)
    (out.loss * graph.loss_weight).backward()
    torch.optim.SGD(params, lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, graph.parameters()))
    path = cs.export(graph, 0, tmp_path / "net.safetensors")
    x = make_input(3, 16, seed=3)
    with torch.no_grad():  # strict: none of the objective's modules is in the file
        assert_same_logits(cs.load_backbone(path)(x), graph.eval()(x)[0])


def test_local_losses_need_local_points_and_sane_weights() -> None:
    with pytest.raises(UserError, match="local points: use pattern 'dropout' with local"):
        build_objective("intra", mid_weight=1.0).attach(
            build_graph("dropout", "cifar_resnet20", input_size=(3, 16, 16)))
    for kwargs, match in (({"mid_weight": -1}, "mid_weight"), ({"beta_mid": -0.1}, "beta_mid"),
                          ({"pull_push_weight": -2}, "pull_push_weight"),
                          ({"pull": [1.0]}, "pull must be a list of 2 numbers"),
                          ({"push": [1.0, -1]}, "push")):
        with pytest.raises(UserError, match=match):
            build_objective("intra", **kwargs)


@pytest.mark.parametrize("override, match", [
    ("graph.local=[layer3]", "comes after the first dropout point"),
    ("graph.local=[nothing]", "invalid split point 'nothing'"),
    ("objective.mid_weight=-1", "mid_weight"),
])
def test_cli_bad_intra_input_is_one_line_exit_2(override, match, tmp_path, capsys) -> None:
    code = main(["train", "--recipe", str(REPO / "recipes" / "demo-intra.yaml"),
                 f"run.dir={tmp_path}", override])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_dropout_views_train_resume_bit_exactly_and_export_equal(tmp_path, capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(REPO / "recipes" / "demo.yaml", [
            "graph={pattern: dropout, split: [layer2, global_pool], samples: 2, "
            "local: [layer1, layer2]}",
            "objective={name: intra, kernel_weight: 0.01, mid_weight: 1.0, "
            "pull_push_weight: 0.1}", "data.image_size=16",
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
    with torch.no_grad():  # strict load: the local classifiers and projections stay behind
        assert_same_logits(cs.load_backbone(out)(x), graph(x)[0])


def test_demo_recipe_loads() -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-intra.yaml")
    assert recipe.graph.pattern == "dropout" and recipe.objective.name == "intra"
    assert recipe.graph.args["samples"] == 2 and len(recipe.graph.args["split"]) == 2
    assert recipe.objective.args["alpha_out"] == 0.5 and recipe.objective.args["temperature"] == 2.0
    assert all(recipe.objective.args[k] > 0 for k in ("mid_weight", "pull_push_weight",
                                                       "kernel_weight"))


@pytest.mark.parametrize("name, views", [("cifar100-resnet18-intra", 1),
                                         ("cifar100-vgg16-intra", 4)])
def test_paper_recipes_build_their_graph_and_objective(name: str, views: int) -> None:
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    t = recipe.train
    assert (t.epochs, t.batch_size, t.lr, t.milestones, t.gamma, t.weight_decay) == \
        (200, 128, 0.1, [60, 120, 160], 0.2, 5e-4)
    graph = build_graph("dropout", recipe.model.name, input_size=(3, 32, 32),
                        model_kwargs={"num_classes": 100}, **recipe.graph.args)
    assert graph.num_heads == views and graph.local_points
    objective = build_objective("intra", **recipe.objective.args)
    objective.attach(graph)
    assert len(objective.classifiers) == len(graph.local_points)
