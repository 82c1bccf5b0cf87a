"""CGL's sub-group imitation (paper 002, eqs. 4-6): rank-free per-step draws, the loss against a
hand computation with the sub-group run on student k's batch (only the drawn students),
empty sub-groups, the ramp-up, bad arguments, and a routed run on per-student subsets through
the engine: resumed bit-exactly, its best student exported strictly with its logits."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import collabsurgery as cs
from collabsurgery.cli import main
from collabsurgery.config.recipe import load_recipe, save_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs import GraphConfig, GraphOutput, TrainingGraph
from collabsurgery.objectives import GroupImitationLoss, build_objective
from collabsurgery.objectives.base import LossContext, Step
from collabsurgery.objectives.group import group_rampup
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import (assert_close_scaled, assert_same_logits, assert_same_weights, latest_weights,
                     make_input, one_line_error, ref_kl, ref_log_softmax, ref_softmax,
                     stop_then_resume, train_in_two_cpu_processes)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


class LinearStudents(TrainingGraph):
    """K linear students ``z_j(x) = x @ W_j`` on per-student batches ``[K, B, D]``; records
    every ``run_heads`` call."""

    per_head_input = True

    def __init__(self, k: int = 4, d: int = 3, c: int = 5) -> None:
        super().__init__()
        self.config = GraphConfig("stub", {"input_size": [d]})
        self.weights = torch.nn.Parameter(
            torch.randn(k, d, c, generator=torch.Generator().manual_seed(7)))
        self.calls: list[tuple[torch.Tensor, list[int]]] = []

    @property
    def num_heads(self) -> int:
        return self.weights.shape[0]

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        self.last_input = x
        logits = torch.einsum("kbd,kdc->kbc", x, self.weights)
        return GraphOutput(logits, {"input": x})

    def run_heads(self, x: torch.Tensor, heads: Sequence[int], source: int | None = None
                  ) -> torch.Tensor:
        assert source is not None and x.data_ptr() == self.last_input[source].data_ptr()
        self.calls.append((x, list(heads)))
        return torch.einsum("bd,kdc->kbc", x, self.weights[list(heads)])


def test_subgroup_draws_are_per_step_rank_free_and_never_self() -> None:
    obj = GroupImitationLoss(probability=0.25)
    a = obj.draw_subgroups(8, Step(seed=1, epoch=2, batch=3))
    assert torch.equal(a, obj.draw_subgroups(8, Step(seed=1, epoch=2, batch=3)))
    assert not torch.equal(a, obj.draw_subgroups(8, Step(seed=1, epoch=2, batch=4)))
    draws = torch.stack([obj.draw_subgroups(8, Step(batch=b)) for b in range(400)])
    assert not draws.diagonal(dim1=1, dim2=2).any()
    rate = draws.sum().item() / (400 * 8 * 7)
    assert abs(rate - 0.25) < 0.02, rate


def test_rampup_is_the_papers_phi() -> None:
    steps = lambda e: Step(epoch=e, epochs=10, batches=1)
    assert group_rampup(steps(0), 0.0, 0.2) == pytest.approx(math.exp(-5))
    assert group_rampup(steps(1), 0.0, 0.2) == pytest.approx(math.exp(-5 * 0.25))
    assert group_rampup(steps(2), 0.0, 0.2) == 1.0 and group_rampup(steps(5), 0.0, 0.2) == 1.0
    assert group_rampup(steps(0), 0.0, 0.0) == 1.0  # no ramp-up range


@pytest.mark.parametrize("p, t, step", [(0.5, 3.0, Step(epoch=5, epochs=10)),
                                        (1.0, 2.0, Step(epoch=1, epochs=10, batch=2))])
def test_loss_matches_a_hand_computation_on_each_students_own_batch(p, t, step) -> None:
    graph = LinearStudents()
    obj = GroupImitationLoss(probability=p, temperature=t, rampup=(0.0, 0.2))
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(2))
    out = graph.run(x)
    loss = obj(out, y, step, graph)
    groups = obj.draw_subgroups(4, step)
    phi = group_rampup(step, 0.0, 0.2)
    w = graph.weights.tolist()
    zk = lambda j, k, b: [sum(x[k, b, d].item() * w[j][d][c] for d in range(3)) for c in range(5)]
    calls = {tuple(h): xk for xk, h in graph.calls}
    for k in range(4):
        members = groups[k].nonzero().flatten().tolist()
        hard = sum(-ref_log_softmax(zk(k, k, b))[y[k, b]] for b in range(6)) / 6
        soft = 0.0
        if members:
            assert torch.equal(calls[tuple(members)], x[k])  # run on student k's batch only
            for b in range(6):
                target = [sum(zk(j, k, b)[c] for j in members) / (p * 3) for c in range(5)]
                soft += ref_kl(ref_softmax(target, t), ref_log_softmax(zk(k, k, b), t)) / 6
        assert loss.per_head[k].item() == pytest.approx(hard + phi * soft, rel=1e-5)
    assert sorted(h for _, hs in graph.calls for h in hs) == sorted(groups.nonzero()[:, 1].tolist())


def test_an_empty_subgroup_gives_no_kl_and_the_targets_carry_no_gradient() -> None:
    graph = LinearStudents()
    obj = GroupImitationLoss(probability=0.2)
    step = next(Step(batch=b) for b in range(100)
                if not obj.draw_subgroups(4, Step(batch=b))[0].any()
                and obj.draw_subgroups(4, Step(batch=b))[1].any())
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(4, 6, dtype=torch.long)
    losses, parts = obj.head_losses(graph.run(x).logits, y, LossContext({"input": x}, step, graph))
    assert parts["soft"][0] == 0 and parts["imitated"][0] == 0 and parts["soft"][1] > 0
    losses[1].backward()  # student 1's loss: its own weights only (its targets are fixed)
    grad = graph.weights.grad
    assert grad[1].abs().sum() > 0
    assert all(grad[j].abs().sum() == 0 for j in (0, 2, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"probability": 0}, "probability must be a number in \\(0, 1\\]"),
    ({"probability": 1.5}, "probability"),
    ({"temperature": 0}, "temperature"),
    ({"rampup": [0.5, 0.2]}, "start <= end"),
    ({"rampup": 0.2}, "rampup must be a list of 2 numbers in \\[0, 1\\], got 0.2"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(UserError, match=match):
        build_objective("cgl", **kwargs)


def test_defaults_and_a_shared_batch_reuses_the_steps_logits() -> None:
    obj = build_objective("cgl")
    assert (obj.probability, obj.temperature, obj.rampup, obj.own_examples) == \
        (0.25, 3.0, (0.0, 0.2), True)
    graph = LinearStudents()
    x = torch.randn(6, 3)
    out = GraphOutput(torch.einsum("bd,kdc->kbc", x, graph.weights), {"input": x.expand(4, 6, 3)})
    obj(out, torch.zeros(6, dtype=torch.long), Step(batch=1))
    assert graph.calls == []  # z_j(x_k) is already in the step's logits


# ---------------------------------------------------------------------------- engine

@pytest.mark.slow
def test_routed_run_on_subsets_resumes_bit_exactly_and_exports_its_best_student(
        tmp_path, capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(REPO / "recipes" / "demo-cgl.yaml", [
            "data.image_size=16", "data.max_train_examples=96", "train.batch_size=8",
            "run.progress=false", "train.epochs=2", f"run.dir={tmp_path}", f"run.name={name}",
            *more])

    straight = engine.train(recipe("straight"))
    resumed = tmp_path / "resumed"
    stop_then_resume(lambda *more: recipe("resumed", *more), resumed, 4, capsys)
    a, b = (latest_weights(d) for d in (straight, resumed))
    assert_same_weights(a, b)
    assert (straight / "graph.json").read_text() == (resumed / "graph.json").read_text()

    out = tmp_path / "best.safetensors"
    assert main(["export", str(straight), "--head", "best", "-o", str(out)]) == 0
    head = int(capsys.readouterr().out.split("exported head ")[1].split()[0])
    graph, history = load_run(straight)
    assert head == history[-1]["holdout"]["best_head"]
    x = make_input(4, 16, seed=5)
    with torch.no_grad():
        assert_same_logits(cs.load_backbone(out)(x), graph(x)[head])


def test_demo_and_paper_recipes_load() -> None:
    demo = load_recipe(REPO / "recipes" / "demo-cgl.yaml")
    assert demo.graph.pattern == "routed" and demo.objective.name == "cgl" and demo.data.subsets
    paper = load_recipe(REPO / "recipes" / "cifar100-resnet18-cgl.yaml")
    assert paper.model.name == "cifar_resnet18" and len(paper.graph.args["split"]) == 8
    assert (paper.graph.args["modules"], paper.graph.args["students"]) == (2, 8)
    assert paper.objective.args == {"probability": 0.25, "temperature": 3.0, "rampup": [0.0, 0.2]}
    t = paper.train
    assert (t.optimizer, t.lr, t.batch_size, t.epochs, t.milestones, t.gamma) == \
        ("adam", 0.001, 64, 200, [60, 120, 160], 0.5)


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one_accumulating_their_batches(tmp_path) -> None:
    """torchrun with 2 CPU processes (each whole steps of every student's subset, the same
    routes and sub-groups on both ranks) against one process accumulating 2 batches per
    optimizer step: the same global batches, so the same parameters (BatchNorm running
    statistics differ: DDP keeps rank 0's)."""
    common = ["data.image_size=16", "data.max_train_examples=96", "train.batch_size=6",
              "train.epochs=1", "run.progress=false", f"run.dir={tmp_path}"]
    single = engine.train(load_recipe(REPO / "recipes" / "demo-cgl.yaml",
                                      [*common, "run.name=single", "train.grad_accum=2"]))
    recipe_file = tmp_path / "ddp.yaml"
    save_recipe(load_recipe(REPO / "recipes" / "demo-cgl.yaml", [*common, "run.name=ddp"]),
                recipe_file)
    train_in_two_cpu_processes(recipe_file)
    ddp = tmp_path / "ddp"
    a, b = (latest_weights(d) for d in (single, ddp))
    assert json.loads((ddp / "summary.json").read_text())["num_processes"] == 2
    assert (single / "graph.json").read_text() == (ddp / "graph.json").read_text()
    graph, _ = load_run(single)
    params = {f"graph.{n}" for n, _ in graph.named_parameters()}
    assert params and params <= a.keys()
    for key in sorted(params):
        assert_close_scaled(a[key], b[key], key, rtol=1e-4, atol_fraction=1e-5)
    steps = [checkpoint.load(checkpoint.latest(d / "checkpoints"))[2].global_step
             for d in (single, ddp)]
    assert steps[0] == steps[1] >= 2


@pytest.mark.parametrize("override, named", [
    ("graph.modules=0", "recipe key 'graph.modules' must be an integer >= 1"),
    ("graph.students=0", "recipe key 'graph.students' must be an integer >= 1"),
    ("objective.probability=1.5", "recipe key 'objective.probability' must be a number in (0, 1]"),
    ("objective.probability=0", "recipe key 'objective.probability'"),
    ("graph.paths=[[0, 1]]", "student 0's path [0, 1] is not 3 module indices in 0..1"),
    ("graph.paths=[[0, 1, 2], [0, 0, 0]]", "student 0's path [0, 1, 2]"),
    ("graph.students=40", "split among 40 students"),
    ("data.subset_overlap=1.0", "data.subset_overlap"),
])
def test_bad_cgl_training_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override,
                                                                       named) -> None:
    argv = ["train", "--recipe", str(REPO / "recipes" / "demo-cgl.yaml"), override,
            "data.max_train_examples=64", "train.batch_size=8", f"run.dir={tmp_path / 'runs'}",
            "run.progress=false"]
    if "paths" in override:
        argv.append("graph.students=null")
    assert main(argv) == 2
    assert named in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
