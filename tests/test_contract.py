"""The training-graph contract (DESIGN 3a), checked for every registered graph kind x backbones.

timm-style: a new graph kind is covered by registering it (``register_graph(kind, example)``);
the arguments come from its registered example, never from a branch on the kind here. For every
kind x backbone: the output shape (and per-head batches where the graph takes them), a finite
gradient for every trainable parameter of graph + objective (an objective-owned one included),
the config's JSON round trip, every head's export, and a bit-exact resume of two SGD steps.

Everything is CPU, 32 px, batch 2, 10 classes; each graph is built once per case.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

import collabsurgery as cs
from collabsurgery.errors import UserError
from collabsurgery.graphs import (GRAPH_KINDS, GraphConfig, TrainingGraph, build_graph,
                                  builder_arguments, rebuild)
from collabsurgery.graphs.base import EXAMPLES
from collabsurgery.objectives import Step, build_objective
from collabsurgery.rundir import checkpoint
from collabsurgery.rundir.checkpoint import Progress
from collabsurgery.train.engine import Collaboration

from conftest import TEST_OBJECTIVE
from helpers import assert_same_logits, calibrate_batchnorm, make_input

SIZE = (3, 32, 32)
CLASSES = 10
BATCH = 2
# a timm ResNet (ImageNet stem), a torchvision model with dropout, a DenseNet (concatenations)
BACKBONES = ("resnet18", "torchvision.mobilenet_v2", "densenet121")
CASES = [(kind, backbone) for kind in GRAPH_KINDS for backbone in BACKBONES]




@functools.lru_cache(maxsize=None)
def split_points(backbone: str) -> tuple[str, ...]:
    return tuple(cs.splits(backbone, input_size=SIZE))


def example_arguments(kind: str, backbone: str) -> tuple[object, dict]:
    """``(model, builder arguments)`` from the kind's registered example; an example may name
    the model itself (peers: a list of students), else the case's backbone is the model."""
    args = dict(EXAMPLES[kind](backbone, list(split_points(backbone))))
    return args.pop("model", backbone), args


def build(kind: str, backbone: str) -> TrainingGraph:
    model, args = example_arguments(kind, backbone)
    if "execution" in builder_arguments(kind):  # auto times the modes: graphs built apart
        args["execution"] = "loop"               # could choose differently
    return build_graph(kind, model, input_size=SIZE, model_kwargs={"num_classes": CLASSES},
                       **args)


@dataclass
class Case:
    kind: str
    backbone: str
    net: TrainingGraph


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """One intra-op thread (conftest): fast on a shared CPU."""
    yield


@pytest.fixture(scope="module", ids=[f"{k}-{b}" for k, b in CASES], params=[
    pytest.param(c, marks=pytest.mark.slow) if c[1] == "densenet121" else c  # the full tier
    for c in CASES])
def case(request) -> Case:
    kind, backbone = request.param
    torch.manual_seed(0)
    net = build(kind, backbone)
    calibrate_batchnorm(net, SIZE[1])
    with torch.no_grad():  # eval logits large enough that a 1e-5 comparison means something
        scale = net.eval()(make_input(BATCH, SIZE[1])).abs().max().item()
    assert scale > 1e-2, f"{kind}-{backbone}: eval logits of size {scale:.1e} compare vacuously"
    return Case(kind, backbone, net)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different logits (far beyond the 1e-5 of an equality check)."""
    return (a - b).abs().max().item() > 1e-3


def labels_for(seed: int) -> torch.Tensor:
    return torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(seed))


def per_head_batch(heads: int) -> torch.Tensor:
    """``[H, B, 3, 32, 32]``: a different batch for every head."""
    return torch.stack([make_input(BATCH, SIZE[1], seed=10 + h) for h in range(heads)])


# ---------------------------------------------------------------------------- shapes

def test_forward_gives_heads_by_batch_by_classes_in_train_and_eval(case):
    net, x = case.net, make_input(BATCH, SIZE[1])
    assert net.num_heads >= 2  # every example must exercise collaboration
    for train in (True, False):
        net.train(train)
        with torch.no_grad():
            out = net(x)
        assert out.shape == (net.num_heads, BATCH, CLASSES), (train, tuple(out.shape))
        assert torch.isfinite(out).all()
    with torch.no_grad():  # forward is run(x).logits, and "input" is the batch per head
        ran = net.run(x, wants=("input",))
        assert torch.equal(ran.logits, net(x))
    assert ran.features["input"].shape == (net.num_heads, *x.shape)
    assert all(torch.equal(ran.features["input"][h], x) for h in range(net.num_heads))


def test_per_head_batch_runs_head_h_on_x_h_or_is_refused_and_wrong_first_dim_is_user_error(case):
    net = case.net.eval()
    h_count = net.num_heads
    with pytest.raises(UserError):
        net(per_head_batch(h_count + 1))
    views = per_head_batch(h_count)
    if not net.per_head_input:  # heads share layers: only a shared batch makes sense
        with pytest.raises(UserError, match="one batch"):
            net(views)
        return
    with torch.no_grad():
        out = net(views)
        assert out.shape == (h_count, BATCH, CLASSES)
        for h in range(h_count):
            assert_same_logits(out[h], net(views[h])[h])
        # and it is not just head h on a shared batch: views differ, so do the logits
        assert differ(out[0], net(views[1])[0])
        assert torch.equal(net.run(views, wants=("input",)).features["input"], views)


# ---------------------------------------------------------------------------- gradients

def test_every_trainable_parameter_of_graph_and_objective_gets_a_finite_gradient(case):
    net = case.net.train()
    collab = Collaboration(net, build_objective(TEST_OBJECTIVE))
    collab.zero_grad(set_to_none=True)
    out = collab(make_input(BATCH, SIZE[1]), labels_for(0), Step())
    (out.loss * net.loss_weight).backward()
    trainable = [(n, p) for n, p in collab.named_parameters() if p.requires_grad]
    assert any(n.startswith("objective.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None]
    not_finite = [n for n, p in trainable if p.grad is not None and not torch.isfinite(p.grad).all()]
    try:
        assert not missing, f"{len(missing)} of {len(trainable)} parameters got no gradient, " \
                            f"e.g. {missing[:5]}"
        assert not not_finite, f"non-finite gradients in {not_finite[:5]}"
        assert collab.objective.log_temperature.grad.abs() > 0
    finally:
        collab.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- config round trip

def test_config_json_round_trip_rebuilds_a_graph_with_identical_eval_outputs(case):
    net = case.net.eval()
    text = net.config.to_json()
    config = GraphConfig.from_json(text)
    assert config.kind == case.kind and config.to_json() == text
    torch.manual_seed(1)  # another initialisation: only the loaded state can make them equal
    twin = rebuild(config)
    assert type(twin) is type(net) and twin.num_heads == net.num_heads
    assert twin.config.to_json() == text
    twin.load_state_dict(net.state_dict(), strict=True)
    x = make_input(BATCH, SIZE[1], seed=3)
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), net(x))


# ---------------------------------------------------------------------------- export

def test_every_head_exports_and_load_backbone_gives_that_heads_eval_logits(case, tmp_path):
    net = case.net.eval()
    x = make_input(BATCH, SIZE[1], seed=4)
    with torch.no_grad():
        expected = net(x)
    first = net.head_state_dict(0)
    for h in range(net.num_heads):
        state = net.head_state_dict(h)
        shared = state.keys() == first.keys() and all(torch.equal(v, first[k])
                                                      for k, v in state.items())
        if h and not shared:  # heads with their own weights: exporting the wrong head shows
            assert differ(expected[h], expected[0]), f"head {h} gives head 0's logits"
        path = cs.export(net, head=h, path=tmp_path / f"head{h}.safetensors")
        model = cs.load_backbone(path)  # rebuilt from metadata alone, loaded strictly
        assert list(model.state_dict()) == list(net.head_state_dict(h)), h
        assert not model.training
        with torch.no_grad():
            got = model(x)
        assert got.shape == (BATCH, CLASSES), (h, net.head_spec(h))
        assert_same_logits(got, expected[h])


# ---------------------------------------------------------------------------- resume

def fresh_collaboration(config_json: str, init_seed: int):
    torch.manual_seed(init_seed)
    collab = Collaboration(rebuild(GraphConfig.from_json(config_json)),
                           build_objective(TEST_OBJECTIVE))
    optimizer = torch.optim.SGD(collab.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    return collab, optimizer


def sgd_step(collab: Collaboration, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One training step in train mode; the global RNG (dropout) is seeded by the step.

    Gradients are clipped: with batch 2 at 32 px, train-mode BatchNorm over 1x1 features
    (mobilenet_v2's last blocks) sees two values per channel and gives gradients of ~1e6.
    """
    collab.train()
    x, labels = make_input(BATCH, SIZE[1], seed=100 + step), labels_for(100 + step)
    torch.manual_seed(1000 + step)
    out = collab(x, labels, Step(seed=0, epoch=0, batch=step, epochs=1, batches=2))
    (out.loss * collab.graph.loss_weight).backward()
    torch.nn.utils.clip_grad_norm_(collab.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_resume_after_one_sgd_step_from_config_and_checkpoint_is_bit_equal_to_two_steps(
        case, tmp_path):
    text = case.net.config.to_json()
    straight, straight_opt = fresh_collaboration(text, init_seed=0)
    sgd_step(straight, straight_opt, 0)
    sgd_step(straight, straight_opt, 1)

    first, first_opt = fresh_collaboration(text, init_seed=0)
    sgd_step(first, first_opt, 0)
    saved = checkpoint.save(tmp_path, 1, first.state_dict(),
                            {"optimizer": first_opt.state_dict()}, Progress(global_step=1), keep=1)
    del first, first_opt

    resumed, resumed_opt = fresh_collaboration(text, init_seed=7)
    a = straight.state_dict()
    assert any(not torch.equal(v, a[k]) for k, v in resumed.state_dict().items()
               if v.is_floating_point()), "a fresh graph must start elsewhere"
    model_state, states, _ = checkpoint.load(saved)
    assert any(k.startswith("objective.") for k in model_state)
    resumed.load_state_dict(model_state, strict=True)
    resumed_opt.load_state_dict(states["optimizer"])
    sgd_step(resumed, resumed_opt, 1)

    b = resumed.state_dict()
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
    momenta_a, momenta_b = straight_opt.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert momenta_a.keys() == momenta_b.keys() and len(momenta_a) == len(list(
        straight.parameters()))
    assert all(torch.equal(momenta_a[i]["momentum_buffer"], momenta_b[i]["momentum_buffer"])
               for i in momenta_a)


def test_registries_refuse_a_kind_or_objective_registered_twice():
    from collabsurgery.graphs import register_graph
    from collabsurgery.objectives import OBJECTIVES, ObjectiveExample, register_objective

    with pytest.raises(ValueError, match="graph kind 'tree' is already registered"):
        register_graph("tree", example=lambda backbone, points: {})(lambda model: None)
    assert GRAPH_KINDS["tree"].__name__ == "build_tree"  # the first registration stands
    with pytest.raises(ValueError, match="objective 'consensus' is already registered"):
        register_objective("consensus", example=ObjectiveExample())(
            type(build_objective("single")))
    assert OBJECTIVES["consensus"].__name__ == "ConsensusLoss"


def test_a_config_that_is_not_a_graph_config_is_a_user_error():
    with pytest.raises(cs.UserError, match="not a graph config"):
        GraphConfig.from_json('{"model": "resnet18"}')
    with pytest.raises(cs.UserError, match="unknown pattern 'spiral'"):
        rebuild(GraphConfig("spiral", {"model": "resnet18"}))
