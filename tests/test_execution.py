"""Execution modes of sibling heads: every mode must match the loop exactly (to fp32 tolerance).

Logits, the gradient of every parameter, BatchNorm running statistics after a training step,
and every head's export after an optimizer step, for a 2-head one-split graph, a 4-head (2, 2)
hierarchical graph and 2 independent instances (whole models, traced on first use); plus bf16
autocast, channels_last, activation checkpointing, tracing into one dynamo graph, and the
fall-back to the loop for a stage the packed executor cannot run.
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import collabsurgery as cs
from collabsurgery.graphs.execution import executor as execution

from helpers import assert_close_scaled, assert_same_training_step, make_input, train_step

MODES = ("fused", "packed", "auto")
GRAPHS = {
    "cifar_resnet20-2heads": dict(model="cifar_resnet20", split="layer1", heads=2),
    "resnet18-4heads": dict(model="resnet18", split="layer2,layer3", heads=4),
    "cifar_resnet20-instances": dict(model="cifar_resnet20", split=None, heads=2,
                                     pattern="instances"),
}


@pytest.fixture(scope="module", params=[  # the fast tier checks the 2-head tree
    name if name == "cifar_resnet20-2heads" else pytest.param(name, marks=pytest.mark.slow)
    for name in GRAPHS])
def net(request) -> cs.TreeNet:
    torch.manual_seed(0)
    kwargs = GRAPHS[request.param]
    return cs.wrap(kwargs["model"], split=kwargs["split"], heads=kwargs["heads"],
                   pattern=kwargs.get("pattern", "tree"), num_classes=5,
                   input_size=(3, 32, 32), execution="loop")


@pytest.fixture(scope="module")
def cifar_tree() -> cs.TreeNet:
    """A cheap 4-head (2, 2) tree for the bf16 and channels_last runs."""
    torch.manual_seed(0)
    return cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, num_classes=5,
                   input_size=(3, 32, 32), execution="loop")


def _pair(net: cs.TreeNet, mode: str, **kwargs) -> tuple[cs.TreeNet, cs.TreeNet]:
    return copy.deepcopy(net).train(), copy.deepcopy(net).train().set_execution(mode, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_loop(net, mode):
    ref, other = _pair(net, mode)
    x = make_input(4)
    assert_close_scaled(train_step(other, x), train_step(ref, x), "logits")
    assert list(other.state_dict()) == list(ref.state_dict())
    grads = dict(ref.named_parameters())
    for name, p in other.named_parameters():
        assert p.grad is not None, name
        assert_close_scaled(p.grad, grads[name].grad, f"grad of {name}")
    buffers = dict(ref.named_buffers())
    for name, b in other.named_buffers():
        assert_close_scaled(b, buffers[name], f"buffer {name}", rtol=1e-5)
    if mode == "auto":
        assert set(other.executor.timings) == {i for i, f in enumerate(net.fanouts) if f > 1}
    else:
        assert all(other.executor.used[i] == mode for i, f in enumerate(net.fanouts) if f > 1), \
            other.describe_execution()
    for model in (ref, other):  # export reads the copies' (updated) weights
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for head in range(net.num_heads):
        expected = ref.head_state_dict(head)
        actual = other.head_state_dict(head)
        assert list(actual) == list(expected)
        for key in expected:
            assert_close_scaled(actual[key], expected[key], f"head {head} {key}", rtol=1e-5)
    ref.eval(), other.eval()
    with torch.no_grad():
        assert_close_scaled(other(x), ref(x), "eval logits")


@pytest.mark.parametrize("mode", ("loop", "fused", "packed",
                                  pytest.param("auto", marks=pytest.mark.slow)))
def test_bf16_autocast_runs(cifar_tree, mode):
    ref, other = _pair(cifar_tree, mode)
    x = make_input(4)
    logits = train_step(other, x, autocast=torch.bfloat16)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    expected = train_step(ref, x, autocast=torch.bfloat16)
    assert_close_scaled(logits, expected, "bf16 logits", rtol=5e-2)
    assert all(torch.isfinite(p.grad).all() for p in other.parameters())


@pytest.mark.parametrize("mode", ("fused", "packed", pytest.param("auto", marks=pytest.mark.slow)))
def test_channels_last_runs(cifar_tree, mode):  # fused once gave wrong gradients here (unpack)
    ref, other = (m.to(memory_format=torch.channels_last) for m in _pair(cifar_tree, mode))
    x = make_input(4).contiguous(memory_format=torch.channels_last)
    assert_close_scaled(train_step(other, x), train_step(ref, x), "logits")
    grads = dict(ref.named_parameters())
    for name, p in other.named_parameters():
        assert_close_scaled(p.grad, grads[name].grad, f"grad of {name}")


@pytest.mark.parametrize("mode", ("loop", "packed"))
def test_checkpointed_branches_match_loop(net, mode):
    ref, other = _pair(net, mode, checkpoint_branches=True)
    # recomputation must not update BatchNorm twice
    assert_same_training_step(other, ref, make_input(4))


def _groupnorm_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        body=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 3)))


def test_unsupported_stage_falls_back_to_loop():
    torch.manual_seed(0)
    net = cs.wrap(_groupnorm_model(), split="stem", heads=2, input_size=(3, 16, 16),
                  execution="packed")
    ref = copy.deepcopy(net).set_execution("loop")
    x = make_input(4, 16)
    assert_close_scaled(train_step(net, x), train_step(ref, x), "logits")
    assert net.executor.used[1] == "loop"
    assert "packed: module 'body.1' (GroupNorm)" in net.describe_execution()
    fused = copy.deepcopy(ref).set_execution("fused")  # its first conv still fuses
    assert_close_scaled(train_step(fused, x), train_step(copy.deepcopy(ref), x), "fused logits")
    assert fused.executor.used[1] == "fused"


def _fake_timings(monkeypatch, fastest: str, gain: float) -> list[dict[str, float]]:
    """Make auto's timing report ``fastest`` ``gain`` faster than every other mode (a
    deterministic stand-in for a machine where it is); returns the timings it reported."""
    reported: list[dict[str, float]] = []

    def fake(plans, group, x, repeats=4):
        times = {mode: (1 - gain if mode == fastest else 1.0) * 1e-3 for mode in plans}
        reported.append(times)
        return times
    monkeypatch.setattr(execution, "_time_plans", fake)
    return reported


@pytest.mark.parametrize("fastest, gain, expected", (("packed", 0.2, "packed"),
                                                     ("fused", 0.2, "fused"),
                                                     ("packed", 0.01, "loop")))
def test_auto_keeps_the_fastest_mode_by_its_margin(monkeypatch, fastest, gain, expected):
    reported = _fake_timings(monkeypatch, fastest, gain)
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 32, 32))
    assert net.executor.mode == "auto"
    ref = copy.deepcopy(net).set_execution("loop")
    x = make_input(4)
    assert_close_scaled(train_step(net, x), train_step(ref, x), "logits")
    assert len(reported) == 1 and set(reported[0]) == {"loop", "fused", "packed"}
    assert net.executor.used == {0: "loop", 1: expected}
    assert net.execution_choices() == {"layer1..output": {
        "mode": expected, "ms": {m: round(t * 1e3, 3) for m, t in reported[0].items()}}}
    described = net.describe_execution()
    assert f"layer1..output: 2 copies in groups of 2, running {expected} (auto timed: loop " \
           "1.0 ms" in described and "only when 3% faster" in described
    train_step(net, x)  # decided once
    assert len(reported) == 1


def test_auto_times_on_the_cpu_and_keeps_a_mode_no_slower_than_the_loop():
    net = cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, input_size=(3, 32, 32))
    train_step(net, make_input(4))
    for stage in (1, 2):
        times = net.executor.timings[stage]
        assert set(times) == {"loop", "fused", "packed"} and all(t > 0 for t in times.values())
        chosen = net.executor.chosen[stage]
        assert times[chosen] <= times["loop"], net.describe_execution()
        assert chosen == "loop" or times[chosen] < 0.97 * times["loop"]


def test_replayed_choices_run_without_timing(monkeypatch):
    _fake_timings(monkeypatch, "packed", 0.2)
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 32, 32))
    fresh = copy.deepcopy(net)
    x = make_input(4)
    train_step(net, x)
    choices = net.execution_choices()
    monkeypatch.setattr(execution, "_time_plans", lambda *a, **k: pytest.fail("timed again"))
    fresh.replay_execution_choices(json.loads(json.dumps(choices)))  # as a checkpoint stores it
    named = copy.deepcopy(fresh).set_execution("packed")
    assert torch.equal(train_step(fresh, x), train_step(named, x))
    assert fresh.executor.used[1] == "packed" and fresh.execution_choices() == choices
    assert "auto replays the checkpointed choice, timed: loop 1.0 ms" in \
        fresh.describe_execution()
    with pytest.raises(cs.UserError, match="name stage 'layer9..output', which this graph lacks"):
        fresh.replay_execution_choices({"layer9..output": {"mode": "loop"}})
    with pytest.raises(cs.UserError, match="is not one of loop, fused, packed"):
        fresh.replay_execution_choices({"layer1..output": {"mode": "vmap"}})
    named = copy.deepcopy(net).set_execution("loop")
    named.replay_execution_choices(choices)  # a named mode is kept
    train_step(named, x)
    assert named.executor.used[1] == "loop"


def test_bad_mode_is_a_user_error(net):
    with pytest.raises(cs.UserError, match="valid: loop, fused, packed, auto"):
        copy.deepcopy(net).set_execution("vmap")
    with pytest.raises(cs.UserError, match="execution must be one of loop, fused, packed, auto"):
        cs.wrap("cifar_resnet20", split="layer1", execution="grouped")


def test_deepcopy_keeps_mode_and_rebuilds_plans(net):
    packed = copy.deepcopy(net).set_execution("packed", checkpoint_branches=True)
    train_step(packed, make_input(4))
    clone = copy.deepcopy(packed)
    assert clone.executor.mode == "packed" and clone.executor.checkpoint_branches
    assert not clone.executor.used  # plans referenced the original's copies
    train_step(clone, make_input(4))
    assert clone.executor.used[len(net.fanouts) - 1] == "packed"


@pytest.mark.slow  # compiling: the full tier
@pytest.mark.parametrize("mode", ("fused", "packed"))
def test_plans_trace_without_graph_breaks(net, mode):
    """Regional compilation: each plan is one dynamo graph (eager backend keeps this fast)."""
    ref, other = _pair(net, mode, compile={"backend": "eager", "fullgraph": True})
    x = make_input(4)
    assert_close_scaled(train_step(other, x), train_step(ref, x), "logits")
    buffers = dict(ref.named_buffers())
    for name, b in other.named_buffers():
        assert_close_scaled(b, buffers[name], f"buffer {name}", rtol=1e-5)
    assert "compiled" in other.describe_execution()
