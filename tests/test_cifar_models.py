"""The papers' CIFAR architectures behave like timm models: registry, cfg, FX, local weights."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.fx
from safetensors.torch import save_file
from torchvision.models.feature_extraction import NodePathTracer, get_graph_node_names

import collabsurgery.models  # noqa: F401  (registers cifar_* with timm)

from helpers import FLOAT32_RTOL, assert_close_scaled

# name -> (paper parameter count in millions, clean cut points to check)
MODELS = {
    "cifar_resnet18": (11.2, ["layer1.0", "layer1", "layer2.0", "layer4.0", "layer4"]),
    "cifar_resnet20": (0.27, ["layer1", "layer2"]),
    "cifar_resnet32": (0.46, ["layer1", "layer2"]),
    "cifar_resnet56": (0.85, ["layer1", "layer2"]),
    "cifar_resnet110": (1.7, ["layer1", "layer2"]),
    "cifar_wrn16_2": (0.69, ["layer1", "layer2"]),
    "cifar_wrn28_10": (36.5, ["layer1", "layer2"]),
    "cifar_densenet40_12": (1.0, ["dense1", "trans1", "dense2", "trans2"]),
}
SMALL = [n for n in MODELS if n not in ("cifar_wrn28_10", "cifar_resnet18")]  # cheap enough to run forward repeatedly


def _x(batch: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, 32, 32, generator=torch.Generator().manual_seed(0))


def test_every_cifar_model_is_registered_without_remote_weights():
    assert set(timm.list_models("cifar_*")) == set(MODELS) | {"cifar_vgg11", "cifar_vgg16"}
    assert not timm.list_models("cifar_*", pretrained=True)  # no remote weights claimed


@pytest.mark.parametrize("name", list(MODELS))
def test_build_params_cfg_feature_info(name):
    model = timm.create_model(name, num_classes=10)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - MODELS[name][0]) / MODELS[name][0] < 0.10, millions
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc"
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    assert model.get_classifier() is modules[cfg["classifier"]] and model.get_classifier(True) == "fc"
    assert len(model.feature_info) == (4 if name == "cifar_resnet18" else 3)
    for info in model.feature_info:
        assert info["module"] in modules and info["num_chs"] > 0
        assert info["reduction"] in (1, 2, 4, 8)
    assert model.num_classes == 10 and model.num_features == model.feature_info[-1]["num_chs"]


@pytest.mark.parametrize("name", SMALL)
def test_forward_and_timm_api(name):
    model = timm.create_model(name, num_classes=10, drop_rate=0.1).eval()
    x = _x()
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 8, 8)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert timm.create_model(name, in_chans=1, num_classes=3)(_x(2, 1)).shape == (2, 3)
    assert timm.create_model(name, global_pool="max", num_classes=4)(x).shape == (2, 4)
    outs = timm.create_model(name, features_only=True)(x)
    assert [o.shape[-1] for o in outs] == [32, 16, 8]


@pytest.mark.parametrize("name", SMALL)
def test_fx_trace_equals_the_model_in_train_and_eval(name):
    model = timm.create_model(name, num_classes=10)
    for train in (True, False):
        model.train(train)
        train_nodes, eval_nodes = get_graph_node_names(model)
        assert train_nodes and eval_nodes
        gm = torch.fx.symbolic_trace(model)
        x = _x()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(0)
        b = gm(x)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", SMALL)
def test_stage_boundaries_are_clean_cuts(name):
    """Every node up to a boundary is used only up to it, and the boundary is one tensor."""
    model = timm.create_model(name)
    for train in (True, False):
        tracer = NodePathTracer()
        nodes = list(tracer.trace(model.train(train)).nodes)
        index = {n: i for i, n in enumerate(nodes)}
        qualname = tracer.node_to_qualname
        for cut in MODELS[name][1]:
            last = max(i for i, n in enumerate(nodes)
                       if n in qualname and (qualname[n] == cut or qualname[n].startswith(cut + ".")))
            for node in nodes[:last]:
                if node.op != "get_attr":
                    assert all(index[u] <= last for u in node.users), (train, cut, node.name)
            assert nodes[last].op in ("call_module", "call_function", "call_method")


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_wrn16_2", "cifar_densenet40_12"])
def test_local_pretrained_file_round_trip(name, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", no_network)
    src = timm.create_model(name, num_classes=7)
    with torch.no_grad():  # non-default BN statistics so the buffers are checked too
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in src.state_dict().items()}, str(path))
    loaded = timm.create_model(name, pretrained=True, num_classes=7,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    x = _x()
    assert torch.equal(src.eval()(x), loaded.eval()(x))
    # A different head size keeps the trunk and drops the classifier (timm's filtering).
    other = timm.create_model(name, pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    assert torch.equal(other.conv1.weight, src.conv1.weight) and other.fc.out_features == 3
    # Without a file there are no weights to load, and timm says so instead of downloading.
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_wrn16_2", "cifar_densenet40_12"])
def test_grad_checkpointing_matches(name):
    model = timm.create_model(name).eval()  # eval: BN statistics are not updated twice
    x = _x()
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for ref, p in zip(expected, model.parameters()):
        assert_close_scaled(p.grad, ref, "grad", rtol=FLOAT32_RTOL)
