"""The routed graph of Collaborative Group Learning (paper 002): seeded paths stored in the config,
parameters constant in the number of students, gradients only through the routed modules,
prefix sharing equal to running each student alone, exports, bad input (API and CLI). The
contract tests (test_contract.py) cover the rest for this kind through its registered example."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

import collabsurgery as cs
from collabsurgery.cli import main
from collabsurgery.errors import UserError
from collabsurgery.graphs import RoutedNet, build_graph, rebuild
from collabsurgery.graphs.routed import draw_paths
from collabsurgery.models import backbones

from helpers import (FLOAT32_RTOL, assert_close_scaled, assert_same_logits, make_input,
                     one_line_error)

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = ["layer1", "layer2"]
SIZE = (3, 16, 16)


def _routed(**args) -> RoutedNet:
    args = {"split": SPLIT, "modules": 2, **({} if "paths" in args else {"students": 4}), **args}
    return build_graph("routed", "cifar_resnet20", input_size=SIZE,
                       model_kwargs={"num_classes": 10}, **args)


def _run_alone(net: RoutedNet, head: int, x: torch.Tensor) -> torch.Tensor:
    """Student ``head``'s path applied module by module to ``x``, nothing shared."""
    for stage, m in zip(net.stages, net.paths[head]):
        x = stage[m](x)
    return x


def test_paths_are_seeded_distinct_stored_in_the_config_and_rebuilt() -> None:
    assert draw_paths(8, 2, 9, seed=0) == draw_paths(8, 2, 9, seed=0)
    assert draw_paths(8, 2, 9, seed=0) != draw_paths(8, 2, 9, seed=1)
    paths = draw_paths(8, 2, 3, seed=0)  # all 8 paths of 2 modules x 3 stages, each once
    assert sorted(map(tuple, paths)) == [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    net = _routed(seed=3)
    assert net.config.args["paths"] == [list(p) for p in net.paths] == draw_paths(4, 2, 3, 3)
    again = rebuild(net.config)
    assert again.paths == net.paths and again.num_heads == 4
    given = _routed(paths=[[1, 1, 0], [0, 0, 0]])
    assert given.paths == [(1, 1, 0), (0, 0, 0)] and given.num_heads == 2


def test_resnet18_paper_setting_parameters_do_not_grow_with_students() -> None:
    points = cs.graphs.splits("resnet18", input_size=(3, 32, 32))
    blocks = [p for p in points if p.startswith("layer") and p.count(".") <= 1]
    assert blocks == ["layer1.0", "layer1", "layer2.0", "layer2", "layer3.0", "layer3",
                      "layer4.0", "layer4"]  # 8 block boundaries: 9 layers of modules
    plain = sum(p.numel() for p in backbones.resolve("resnet18")[0].parameters())
    for students in (2, 8, 32):
        net = cs.wrap("resnet18", split=blocks, pattern="routed", modules=2, students=students,
                      input_size=(3, 32, 32))
        assert len(net.stages) == 9 and all(len(s) == 2 for s in net.stages)
        assert net.num_heads == students
        assert sum(p.numel() for p in net.parameters()) == 2 * plain


def test_a_students_loss_reaches_exactly_the_modules_on_its_path() -> None:
    net = _routed(paths=[[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    x = make_input(4, 16, seed=1)
    for k in range(3):
        net.zero_grad(set_to_none=True)
        net(x)[k].logsumexp(-1).sum().backward()
        for i, copies in enumerate(net.stages):
            for m, module in enumerate(copies):
                reached = any(p.grad is not None and p.grad.abs().sum() > 0
                              for p in module.parameters())
                assert reached == (net.paths[k][i] == m), (k, i, m)
    assert not net.may_skip_modules  # every module is on some path
    assert _routed(paths=[[0, 1, 1], [0, 1, 0]]).may_skip_modules  # module 1 of stage 0 unused


@pytest.mark.parametrize("train", [True, False])
def test_prefix_sharing_gives_each_students_own_logits_and_gradients(train: bool) -> None:
    net = _routed(paths=[[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]]).train(train)
    alone = copy.deepcopy(net)
    x = make_input(4, 16, seed=2)
    shared = net(x)
    separate = torch.stack([_run_alone(alone, k, x) for k in range(4)])
    assert_close_scaled(shared, separate, "logits", rtol=FLOAT32_RTOL)
    weights = torch.randn_like(shared)
    (shared * weights).sum().backward()
    (separate * weights).sum().backward()
    for (name, a), b in zip(net.named_parameters(), alone.parameters()):
        # summed in another order: float32 noise relative to the gradient's scale
        assert_close_scaled(a.grad, b.grad, name, rtol=1e-4, atol_fraction=1e-5)
    heads = [3, 1]
    assert_close_scaled(net.run_heads(x, heads), shared[heads], "run_heads", rtol=FLOAT32_RTOL)


def test_per_student_batches_run_student_k_on_x_k() -> None:
    net = _routed().eval()
    x = torch.stack([make_input(3, 16, seed=k) for k in range(4)])
    with torch.no_grad():
        out = net(x)
        for k in range(4):
            assert_same_logits(out[k], _run_alone(net, k, x[k]))


def test_every_student_exports_as_the_plain_model_with_its_logits(tmp_path) -> None:
    net = _routed(paths=[[0, 1, 0], [1, 0, 1]])
    with torch.no_grad():
        for m in range(2):  # give module 1 its own BatchNorm statistics
            for copies in net.stages:
                for buf in copies[m].buffers():
                    if buf.dtype.is_floating_point:
                        buf.add_(0.1 * (m + 1))
    net.eval()
    x = make_input(3, 16, seed=4)
    with torch.no_grad():
        logits = net(x)
    for k in range(2):
        path = cs.export(net, k, tmp_path / f"student{k}.safetensors")
        model = cs.load_backbone(path)
        with torch.no_grad():
            assert_same_logits(model(x), logits[k])
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("args, match", [
    ({"modules": 0}, "modules must be an integer >= 1, got 0"),
    ({"students": 0}, "students must be an integer >= 1, got 0"),
    ({"students": True}, "students must be an integer >= 1"),
    ({"paths": [[0, 1]]}, r"student 0's path \[0, 1\] is not 3 module indices "
                                            r"in 0..1"),
    ({"paths": [[0, 1, 2]]}, r"path \[0, 1, 2\] is not 3 module indices"),
    ({"paths": [[0, 1, 1]], "students": 2}, "students is 2 but paths gives 1 paths"),
    ({"paths": []}, "must be a list of paths"),
])
def test_bad_arguments_name_the_argument_and_what_is_valid(args: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        _routed(**args)


@pytest.mark.parametrize("extra, match", [
    (["--modules", "0"], "modules must be an integer >= 1"),
    (["--students", "0"], "students must be an integer >= 1"),
    (["--paths", "0,1;1,0"], "student 0's path"),
    (["--paths", "0,1,5"], r"path \[0, 1, 5\] is not 3 module indices in 0..1"),
])
def test_cli_wrap_bad_routes_are_one_line_exit_2(extra, match, tmp_path, capsys) -> None:
    argv = ["wrap", "cifar_resnet20", "--pattern", "routed", "--split", "layer1,layer2",
            "--input-size", "16", "--save", str(tmp_path / "g.safetensors"), *extra]
    assert main(argv) == 2
    assert re.search(match, one_line_error(capsys.readouterr().err))
    assert os.listdir(tmp_path) == []


def test_cli_wrap_prints_paths_sharing_and_costs(capsys) -> None:
    assert main(["wrap", "cifar_resnet20", "--pattern", "routed", "--split", "layer1,layer2",
                 "--modules", "2", "--students", "3", "--route-seed", "5", "--input-size",
                 "16"]) == 0
    out = capsys.readouterr().out
    for k, path in enumerate(draw_paths(3, 2, 3, 5)):
        assert f"student {k}: {' '.join(map(str, path))}" in out
    assert "heads per copy" in out and "runs" in out
    params = next(line for line in out.splitlines() if line.startswith("parameters"))
    assert params.split()[-1] == "2.00"


def test_imitation_forwards_reuse_the_layers_shared_with_the_source_student() -> None:
    net = _routed(paths=[[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]]).train()
    x = torch.stack([make_input(3, 16, seed=k) for k in range(4)])
    net(x)
    calls: list[tuple[int, int]] = []
    hooks = [module.register_forward_pre_hook(lambda m, a, i=i, c=c: calls.append((i, c)))
             for i, copies in enumerate(net.stages) for c, module in enumerate(copies)]
    try:
        with torch.no_grad():
            reused = net.run_heads(x[0], [1, 2, 3], source=0)
            # student 0's path is (0, 0, 0): prefixes (0,) and (0, 0) come from its run
            assert sorted(calls) == [(0, 1), (1, 1), (1, 1), (2, 1), (2, 1), (2, 1)]
            calls.clear()
            fresh = net.run_heads(x[0].clone(), [1, 2, 3], source=0)  # not the run's batch
            # nothing reused: distinct prefixes of (0,0,1), (0,1,1), (1,1,1): 2 + 3 + 3 calls
            assert len(calls) == 8
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(reused, fresh)


def test_concatenated_execution_gives_the_loops_logits_gradients_and_statistics() -> None:
    loop = _routed(paths=[[0, 0, 0], [0, 1, 1], [1, 1, 0], [0, 1, 0]]).train()
    concat = copy.deepcopy(loop).set_execution("concat")
    assert concat.describe_execution() == "execution: concat"
    x = torch.stack([make_input(3, 16, seed=k) for k in range(4)])
    a, b = loop(x), concat(x)
    assert_close_scaled(b, a, "logits", rtol=FLOAT32_RTOL)
    weights = torch.randn_like(a)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    for (name, p), q in zip(loop.named_parameters(), concat.parameters()):
        assert_close_scaled(q.grad, p.grad, name, rtol=1e-4, atol_fraction=1e-5)
    for (name, s), t in zip(loop.named_buffers(), concat.buffers()):
        assert_close_scaled(t, s, name, rtol=FLOAT32_RTOL)
    with pytest.raises(UserError, match="runs as loop or concat or auto; got 'packed'"):
        loop.set_execution("packed")
    with pytest.raises(UserError, match="execution must be one of loop, concat, auto"):
        _routed(execution="fused")
    assert _routed(execution="concat").execution == "concat"
