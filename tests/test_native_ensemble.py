"""ONE (Lan et al. 2018): the gate on the shared trunk, the loss against a hand computation
(plain Python loops), the detached teacher, the KL ramp-up, graphs without a trunk (API and
CLI), and a tree of three branches trained through the engine: gate checkpointed, never
exported, resumed bit-exactly."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import collabsurgery as cs
from collabsurgery.cli import main
from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.graphs import GraphConfig, GraphOutput, TrainingGraph, build_graph
from collabsurgery.models import backbones
from collabsurgery.objectives import NativeEnsembleLoss, build_objective
from collabsurgery.objectives.base import LossContext, Step, sigmoid_rampup
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import (assert_same_weights, latest_weights, one_line_error, random_logits, ref_kl,
                     ref_log_softmax, ref_softmax, stop_then_resume)

REPO = Path(__file__).resolve().parents[1]
RESNET = {"model_kwargs": {"num_classes": 10}}

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


class FeatureIsInput(TrainingGraph):
    """A stand-in tree: its trunk feature is the input itself (``[B, C, 2, 2]``, chosen by the
    test), so the gate's input is known exactly; the logits are the test's own."""

    def __init__(self, heads: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.config = GraphConfig("stub", {"input_size": [channels, 2, 2]})
        self.heads = heads

    @property
    def num_heads(self) -> int:
        return self.heads

    @property
    def trunk(self) -> str | None:
        return "trunk"

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        return GraphOutput(torch.zeros(self.heads, x.shape[0], 5),
                           {w: x.expand(self.heads, *x.shape) for w in wants})


def _attached(heads: int = 3, channels: int = 4, **kwargs) -> NativeEnsembleLoss:
    obj = NativeEnsembleLoss(**kwargs)
    obj.attach(FeatureIsInput(heads, channels))
    return obj


def _feature(b: int = 6, c: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, 2, 2, generator=torch.Generator().manual_seed(seed))


def _context(x: torch.Tensor, heads: int = 3, step: Step | None = None) -> LossContext:
    return LossContext({"trunk": x.expand(heads, *x.shape)}, step or Step())


def _tree(size: int) -> TrainingGraph:
    return build_graph("tree", "cifar_resnet20", split=["layer2"], heads=3,
                       input_size=(3, size, size), **RESNET)


# ---------------------------------------------------------------------------- the gate

def test_gate_rows_are_distributions_at_two_input_sizes_and_attach_is_idempotent() -> None:
    small, large = _tree(16), _tree(24)
    small.train()
    obj = build_objective("one")
    obj.attach(small)
    assert small.training and obj.wants == ("layer2",)
    gate = obj.gate
    assert (gate[2].in_features, gate[2].out_features) == (32, 3)
    small.eval()
    obj.attach(small)
    obj.attach(large)  # the same trunk channels: the gate (and its weights) is kept
    assert obj.gate is gate and not small.training
    labels = torch.tensor([0, 1, 2, 3])
    for graph, size in ((small, 16), (large, 24)):
        graph.train()
        out = graph.run(torch.randn(4, 3, size, size), wants=obj.wants)
        assert out.features["layer2"].shape[:3] == (3, 4, 32)
        for mode in (True, False):
            obj.train(mode)
            g = obj.gate(out.features["layer2"][0])
            assert g.shape == (4, 3) and torch.all(g >= 0)
            torch.testing.assert_close(g.sum(1), torch.ones(4))
        obj.train()
        loss = obj(out, labels, Step())
        assert loss.per_head.shape == (3,) and torch.isfinite(loss.loss)


def _ref_gate(x: torch.Tensor, gate: nn.Sequential, train: bool) -> list[list[float]]:
    """Pool, Linear, BatchNorm1d (batch or running statistics), ReLU, softmax with loops."""
    linear, bn = gate[2], gate[3]
    xs, w, bias = x.double().tolist(), linear.weight.double().tolist(), linear.bias.tolist()
    pooled = [[sum(sum(row) for row in ch) / 4 for ch in xb] for xb in xs]
    z = [[bias[k] + sum(w[k][c] * p[c] for c in range(len(p))) for k in range(len(bias))]
         for p in pooled]
    n, k_n = len(z), len(bias)
    if train:
        mean = [sum(z[b][k] for b in range(n)) / n for k in range(k_n)]
        var = [sum((z[b][k] - mean[k]) ** 2 for b in range(n)) / n for k in range(k_n)]
    else:
        mean, var = bn.running_mean.tolist(), bn.running_var.tolist()
    scale, shift = bn.weight.tolist(), bn.bias.tolist()
    normed = [[max(0.0, (z[b][k] - mean[k]) / math.sqrt(var[k] + bn.eps) * scale[k] + shift[k])
               for k in range(k_n)] for b in range(n)]
    return [ref_softmax(row) for row in normed]


def test_gate_matches_loops_in_train_and_eval_mode() -> None:
    torch.manual_seed(0)
    obj = _attached()
    bn = obj.gate[3]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.3, -0.2]))
        bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.0]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
    x = _feature()
    for train in (True, False):
        obj.train(train)
        # a float32 gate against a float64 reference: float32 tolerances
        torch.testing.assert_close(obj.gate(x).double(),
                                   torch.tensor(_ref_gate(x, obj.gate, train), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the loss

def ref_one(z: torch.Tensor, y: torch.Tensor, g: list[list[float]], t: float
            ) -> list[tuple[float, float, float]]:
    """Per branch (CE(y, z_k), CE(y, z_e) / K, T^2 KL(softmax(z_e/T) || softmax(z_k/T)))."""
    zl, yl = z.double().tolist(), y.tolist()
    k_n, b_n, c_n = len(zl), len(yl), len(zl[0][0])
    ze = [[sum(g[b][k] * zl[k][b][c] for k in range(k_n)) for c in range(c_n)] for b in range(b_n)]
    ce_e = sum(-ref_log_softmax(ze[b])[yl[b]] for b in range(b_n)) / b_n
    out = []
    for zk in zl:
        hard = sum(-ref_log_softmax(zk[b])[yl[b]] for b in range(b_n)) / b_n
        soft = sum(ref_kl(ref_softmax(ze[b], t), ref_log_softmax(zk[b], t))
                   for b in range(b_n)) / b_n
        out.append((hard, ce_e / k_n, t * t * soft))
    return out


@pytest.mark.parametrize("t,ramp,step", [
    (3.0, 80.0, Step()),
    (2.0, 2.5, Step(epoch=1, batch=1, batches=4)),  # t = 1.25 = R/2: w = exp(-1.25)
    (1.0, 0.0, Step()),                              # no ramp-up: w = 1
])
def test_loss_matches_loop_reference(t: float, ramp: float, step: Step) -> None:
    z, y = random_logits(h=3, b=6, c=5, seed=2)
    obj = _attached(temperature=t, rampup_epochs=ramp)
    x = _feature(seed=3)
    with torch.no_grad():
        obj.gate[3].weight.fill_(5.0)  # spread the gate's output away from uniform
        g = obj.gate(x).tolist()  # train mode: the gate normalises with the batch's statistics
    out = obj(GraphOutput(z, {"trunk": x.expand(3, *x.shape)}), y, step)
    ref = ref_one(z, y, g, t)
    w = sigmoid_rampup(step.epoch + step.batch / step.batches, ramp)
    torch.testing.assert_close(out.per_head, torch.tensor([h + e + w * s for h, e, s in ref]))
    for i, name in enumerate(("hard", "ensemble", "soft")):
        torch.testing.assert_close(out.parts[name], torch.tensor(sum(r[i] for r in ref)))
    assert out.loss.dim() == 0 and not out.per_head.requires_grad
    assert max(max(row) for row in g) > 0.5  # a gate far from uniform was tested


def test_teacher_is_detached_so_the_gate_learns_only_from_the_ensembles_ce() -> None:
    obj = _attached(rampup_epochs=0)
    z, y = random_logits(h=3, b=6, c=5, seed=5)
    z.requires_grad_(True)
    x = _feature(seed=6).requires_grad_(True)
    params = list(obj.gate.parameters())
    per_head, parts = obj.head_losses(z, y.expand(3, 6), _context(x))
    soft_grads = torch.autograd.grad(parts["soft"].sum(), [*params, x], retain_graph=True,
                                     allow_unused=True)
    assert all(gr is None or torch.count_nonzero(gr) == 0 for gr in soft_grads)
    mixed = torch.autograd.grad(parts["ensemble"].sum(), params, retain_graph=True)
    total = torch.autograd.grad(per_head.sum(), params, retain_graph=True)
    assert torch.count_nonzero(mixed[0]) > 0  # the Linear's weight
    for a, b in zip(total, mixed):
        torch.testing.assert_close(a, b)
    for k in range(3):  # branch k's KL moves only z_k: the teacher is held fixed
        (gk,) = torch.autograd.grad(parts["soft"][k], z, retain_graph=True)
        others = [j for j in range(3) if j != k]
        assert torch.count_nonzero(gk[others]) == 0 and torch.count_nonzero(gk[k]) > 0
    (ge,) = torch.autograd.grad(parts["ensemble"].sum(), z)  # CE(y, z_e) reaches every branch
    assert all(torch.count_nonzero(ge[k]) > 0 for k in range(3))


def test_sigmoid_rampup_values_and_the_kl_weight_they_give() -> None:
    r = 80.0
    for t, expected in ((0.0, math.exp(-5)), (r / 2, math.exp(-1.25)), (r, 1.0), (2 * r, 1.0)):
        assert sigmoid_rampup(t, r) == pytest.approx(expected, rel=1e-12)
    assert sigmoid_rampup(0.0, 0.0) == 1.0
    # through the objective: t = epoch + batch / batches, the KL weighted by w(t)
    obj = _attached(rampup_epochs=3.0)
    z, y = random_logits(h=3, b=6, c=5, seed=1)
    context = _context(_feature())
    for (epoch, batch), expected in (((0, 0), math.exp(-5)), ((1, 2), math.exp(-1.25)),
                                     ((3, 0), 1.0), ((6, 0), 1.0)):
        step = Step(epoch=epoch, batch=batch, epochs=10, batches=4)
        obj.gate.eval()  # the same gate output at every step
        per_head, parts = obj.head_losses(z, y.expand(3, 6), LossContext(context.features, step))
        w = (per_head - parts["hard"] - parts["ensemble"]) / parts["soft"]
        torch.testing.assert_close(w, torch.full((3,), expected))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"temperature": "3"}, "temperature must be a number > 0"),
    ({"rampup_epochs": -1}, "rampup_epochs must be a number >= 0"),
    ({"rampup_epochs": float("inf")}, "rampup_epochs must be a number >= 0"),
    ({"gate": 2}, "objective 'one' takes no argument 'gate'"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        build_objective("one", **kwargs)


def test_defaults_and_bad_input() -> None:
    obj = build_objective("one")
    assert isinstance(obj, NativeEnsembleLoss)
    assert (obj.temperature, obj.rampup_epochs, obj.gate) == (3.0, 80.0, None)
    z, y = random_logits(h=3, b=6)
    with pytest.raises(UserError, match=r"no gate yet: call attach\(graph\) first"):
        obj(z, y)
    obj = _attached()
    with pytest.raises(UserError, match="same examples"):
        obj.head_losses(z, torch.stack([y, y, y.flip(0)]), _context(_feature()))


@pytest.mark.parametrize("kind, args", [
    ("instances", {"heads": 2}),
    ("peers", {}),
    ("tree", {"heads": 1}),
])
def test_attach_needs_a_shared_trunk(kind: str, args: dict) -> None:
    model = ["cifar_resnet20"] * 2 if kind == "peers" else "cifar_resnet20"
    graph = build_graph(kind, model, input_size=(3, 16, 16), **RESNET, **args)
    with pytest.raises(UserError, match=f"ONE needs a shared trunk: pattern tree with a split "
                                        f"point; got pattern {kind}$"):
        NativeEnsembleLoss().attach(graph)


@pytest.mark.parametrize("graph", ["{pattern: peers}", "{pattern: instances, heads: 3}"])
def test_cli_without_a_trunk_is_one_line_and_writes_nothing(tmp_path, capsys, graph) -> None:
    model = ["model.name=[cifar_resnet20, cifar_resnet20]"] if "peers" in graph else []
    argv = ["train", "--recipe", str(REPO / "recipes" / "demo-one.yaml"), f"graph={graph}",
            *model, "data.max_train_examples=64", "train.batch_size=16",
            f"run.dir={tmp_path / 'runs'}", "run.progress=false"]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "ONE needs a shared trunk" in line and line.split()[-1] in ("peers", "instances")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- engine

@pytest.mark.slow
def test_engine_trains_the_gate_exports_none_of_it_and_resumes_bit_exactly(tmp_path,
                                                                            capsys) -> None:
    def recipe(name: str, *more: str):
        return load_recipe(None, [
            "data.image_size=16", "data.max_train_examples=64", "train.batch_size=16",
            "run.progress=false", "train.epochs=2", "model.name=cifar_resnet20",
            # a named execution mode: two fresh runs of auto may choose differently
            "graph={pattern: tree, split: [layer2], heads: 3, execution: packed}",
            "objective={name: one, rampup_epochs: 1}", f"run.dir={tmp_path}", f"run.name={name}",
            *more])

    straight = engine.train(recipe("straight"))
    resumed = tmp_path / "resumed"
    stop_then_resume(lambda *more: recipe("resumed", *more), resumed, 6, capsys)
    final = checkpoint.latest(straight / "checkpoints")
    a, b = (latest_weights(d) for d in (straight, resumed))
    assert_same_weights(a, b)
    gate_keys = sorted(k for k in a if k.startswith("objective."))
    assert {k.rsplit(".", 1)[-1] for k in gate_keys} >= {"weight", "bias", "running_mean"}
    mid = load_file(str(resumed / "checkpoints" / "ckpt-00000006" / "model.safetensors"))
    assert all(not torch.equal(mid[k], a[k]) for k in gate_keys)  # trained in steps 7-8
    assert not torch.equal(a["objective.gate.3.weight"], torch.ones(3))  # BN weight from 1

    out = tmp_path / "head0.safetensors"
    assert main(["export", str(straight), "--head", "0", "-o", str(out)]) == 0
    exported = load_file(str(out))
    plain = backbones.resolve("cifar_resnet20", num_classes=10)[0].state_dict()
    assert set(exported) == set(plain)
    assert not any("gate" in k or k.startswith("objective") for k in exported)
    cs.load_backbone(out)  # a strict load into the plain model
    assert final.name == "ckpt-00000008"


def test_demo_recipe_loads() -> None:
    recipe = load_recipe(REPO / "recipes" / "demo-one.yaml")
    assert recipe.name == "demo-one" and recipe.objective.name == "one"
    assert recipe.objective.args == {"temperature": 3.0, "rampup_epochs": 5.0}
    assert recipe.graph.pattern == "tree" and recipe.graph.args["heads"] == 3
    assert recipe.graph.args["split"] == ["layer2"]
