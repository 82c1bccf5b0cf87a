"""Hierarchical dropout views (paper 004, Fig. 1d): K^n views from n points, views that differ in
training and equal the plain model in eval, the model's own dropout modules sampled in place,
work before the first point done once, one weight set, bad input (API and CLI). The contract
tests (test_contract.py) cover export, config round trip and resume for this kind."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from collabsurgery.cli import main
from collabsurgery.errors import UserError
from collabsurgery.graphs import DropoutViews, build_graph

from helpers import (FLOAT32_RTOL, assert_close_scaled, assert_same_logits, make_input,
                     one_line_error)

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyVGG(nn.Module):
    """A VGG in miniature: convolutions, then a classifier with two dropout layers (the
    structure paper 004 samples: K=2 gives 4 views)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.4), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _views(model: nn.Module | str = None, **args) -> DropoutViews:
    model = TinyVGG() if model is None else model
    return build_graph("dropout", model, input_size=(3, 16, 16), **args)


def test_the_models_own_dropouts_give_k_to_the_n_views_that_differ_then_agree_in_eval() -> None:
    plain = TinyVGG()
    net = _views(plain)
    assert [d.p for d in net.drops] == [0.3, 0.4] and net.num_heads == 4
    assert net.loss_weight == 0.25  # the mean over views
    assert net.config.args["split"] == ["classifier.2", "classifier.5"]
    for stage, point in zip(net.stages, ("classifier.2", "classifier.5")):
        train_calls = [n.target for n in stage[0].train_graph.nodes if n.op == "call_module"]
        assert point not in train_calls  # sampled by the graph instead, never twice
    x = make_input(3, 16, seed=1)
    torch.manual_seed(0)
    views = net.train()(x)
    assert views.shape == (4, 3, 10)
    assert all((views[i] - views[j]).abs().max() > 1e-4 for i in range(4) for j in range(i))
    net.eval()
    plain.eval()
    with torch.no_grad():
        out = net(x)
        for v in range(4):
            assert_same_logits(out[v], plain(x))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("samples, points, views", [(3, 2, 9), (2, 1, 2), (1, 2, 1)])
def test_views_are_samples_to_the_points(samples: int, points: int, views: int) -> None:
    split = ["classifier.2", "classifier.5"][:points]
    net = _views(split=split, samples=samples)
    assert net.num_heads == views
    assert net.train()(make_input(2, 16)).shape == (views, 2, 10)
    assert net.eval()(make_input(2, 16)).shape == (views, 2, 10)


def test_work_before_the_first_point_runs_once_and_each_later_stage_on_every_view() -> None:
    net = _views(samples=2)
    seen = []
    hooks = [stage[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
             for stage in net.stages]
    try:
        net.train()(make_input(3, 16))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [3, 6, 12]  # stage 0 once, then 2 and 4 views of the batch


def test_a_model_without_dropout_gets_one_point_before_the_classifier() -> None:
    net = build_graph("dropout", "cifar_resnet20", input_size=(3, 16, 16), p=0.2)
    assert net.config.args["split"] == ["global_pool"] and net.num_heads == 2
    assert [d.p for d in net.drops] == [0.2]
    inserted = _views(split=["features"], p=0.25)  # a split point that is not a dropout
    assert [d.p for d in inserted.drops] == [0.25]


@pytest.mark.parametrize("args, match", [
    ({"p": 1.0}, r"p must be a number in \[0, 1\), got 1.0"),
    ({"p": -0.1}, r"p must be a number in \[0, 1\)"),
    ({"samples": 0}, "samples must be an integer >= 1, got 0"),
    ({"split": ["classifier.9"]}, "classifier.9"),
])
def test_bad_arguments_are_one_clear_line(args, match) -> None:
    with pytest.raises(UserError, match=match):
        _views(**args)


@pytest.mark.parametrize("extra, match", [
    (["--split", "layer9"], "layer9"),
    (["--samples", "0"], "samples must be an integer >= 1"),
    (["--dropout-p", "1"], r"p must be a number in [0, 1)"),
])
def test_cli_wrap_bad_point_is_one_line_exit_2(extra, match, tmp_path, capsys) -> None:
    argv = ["wrap", "cifar_resnet20", "--pattern", "dropout", "--input-size", "16",
            "--save", str(tmp_path / "g.safetensors"), *extra]
    assert main(argv) == 2
    assert match in one_line_error(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_cli_wrap_prints_the_views(capsys) -> None:
    assert main(["wrap", "cifar_resnet20", "--pattern", "dropout", "--split", "layer2,layer3",
                 "--samples", "3", "--dropout-p", "0.2", "--input-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "9 views: 2 dropout point(s) sampled 3 times each: layer2 (p=0.2), layer3 (p=0.2)" in out
    params = next(line for line in out.splitlines() if line.startswith("parameters"))
    assert params.split()[-1] == "1.00"


# --- local points: a layer rerun on its detached input ---------------------------------------

def _local_net() -> DropoutViews:
    return build_graph("dropout", "cifar_resnet20", split="layer2,global_pool",
                       local="layer1,layer2", input_size=(3, 16, 16)).train()


def test_a_local_points_layer_is_its_last_block_and_the_graph_cuts_around_it() -> None:
    net = _local_net()
    assert net.local_points == ["layer1", "layer2"]
    # the last clean cut before each point's last convolution: the last residual block
    assert [net.stage_names[a].split("..")[0] for a, _ in net.local_layers.values()] == \
        ["layer1.1", "layer2.1"]
    assert [net.stage_names[b].split("..")[1] for _, b in net.local_layers.values()] == \
        ["layer1", "layer2"]
    assert net.num_heads == 4  # cuts for local layers are no dropout points
    vgg = _views(local="features.2")  # conv-BN-ReLU right after the input: its layer is all
    assert vgg.local_layers == {"features.2": (0, 0)}


def test_local_features_equal_the_main_path_and_leave_batchnorm_statistics_alone() -> None:
    net, plain = _local_net(), _local_net()
    plain.load_state_dict(net.state_dict())
    x = make_input(4, 16)
    torch.manual_seed(0)
    out = net.run(x, wants=["local:layer1", "local:layer2", "layer1", "layer2"])
    torch.manual_seed(0)
    assert_same_logits(out.logits, plain.run(x).logits)
    for point in ("layer1", "layer2"):
        assert out.features[f"local:{point}"].shape == out.features[point].shape
        assert_close_scaled(out.features[f"local:{point}"], out.features[point], point,
                            rtol=FLOAT32_RTOL)
    # the reruns update throw-away copies of the BatchNorm buffers, not the graph's
    for (name, a), b in zip(net.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name


def test_a_local_features_gradient_reaches_its_layer_and_nothing_below_or_above() -> None:
    net = _local_net()
    out = net.run(make_input(4, 16), wants=["local:layer2"])
    out.features["local:layer2"].square().mean().backward()
    for name, p in net.named_parameters():
        in_layer = ".layer2.2." in name  # layer2's last block: 'layer2.1..layer2'
        assert (p.grad is not None and p.grad.abs().sum() > 0) == in_layer, name


@pytest.mark.parametrize("local, match", [
    ("layer3", "comes after the first dropout point"),
    ("layer9", "invalid split point 'layer9'"),
    ("layer2,layer1", "execution order"),
])
def test_bad_local_points_are_one_clear_line(local, match) -> None:
    with pytest.raises(UserError, match=match):
        build_graph("dropout", "cifar_resnet20", split="layer2,global_pool", local=local,
                    input_size=(3, 16, 16))


def test_a_local_point_with_no_convolution_before_it_is_refused() -> None:
    class PoolFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(2)
            self.bn = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(self.bn(self.pool(x))).mean((2, 3)))

    with pytest.raises(UserError, match="no convolution before it"):
        build_graph("dropout", PoolFirst(), split="conv", local="bn", input_size=(3, 8, 8))
