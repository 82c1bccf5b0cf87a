"""Training graphs: every backbone x pattern trains and exports; rescaling; per-head BN/dropout;
initialisation; what the summary reports."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open

import collabsurgery as cs
from collabsurgery.measure import costs
from collabsurgery.models import backbones

from helpers import FLOAT32_RTOL, assert_close_scaled, assert_same_logits, make_input

pytestmark = pytest.mark.usefixtures("one_thread")

C = 10
SIZE = (3, 32, 32)

# (model, pattern, split, heads, branches). Cheap models get every pattern; the expensive ones
# (resnet50, wide_resnet50_2, densenet121, the VGGs) one split with two heads at 32 px.
# The VGG splits sit right before a ReLU(inplace=True): the in-place trap at the cut.
CHEAP = {
    "resnet18": ("layer2", "layer1,layer3", "layer2,layer3"),
    "torchvision.resnet18": ("layer2", "layer1,layer3", "layer2,layer4"),
    "mobilenetv2_100": ("blocks.3", "blocks.2,blocks.4", "blocks.1,blocks.5"),
    "torchvision.mobilenet_v2": ("features.7", "features.4,features.11", "features.3,features.14"),
    "cifar_resnet20": ("layer1", "layer1,layer2", "layer1,layer2"),
    "cifar_densenet40_12": ("trans1", "trans1,trans2", "dense1,dense2"),
}
EXPLICIT_BRANCHES = {  # the third split of each cheap model, with uneven fan-outs
    "resnet18": (1, 2), "torchvision.resnet18": (2, 1), "mobilenetv2_100": (2, 1),
    "torchvision.mobilenet_v2": (1, 2), "cifar_resnet20": (2, 1), "cifar_densenet40_12": (1, 2),
}
# model -> (split, extra factory kwargs). timm's VGGs run their 7x7 ConvMlp head on a 1x1 map
# upsampled to 7x7; vgg11 keeps the full-size head (103M weights), the other two a narrower one
# (mlp_ratio, 8x fewer weights) to save time, which also round-trips a float factory kwarg.
EXPENSIVE = {
    "resnet50": ("layer3", {}),
    "wide_resnet50_2": ("layer3", {}),
    "densenet121": ("features.transition2", {}),
    "vgg11": ("features.0", {}),
    "vgg11_bn": ("features.1", {"mlp_ratio": 0.125}),
    "vgg16": ("features.2", {"mlp_ratio": 0.125}),
    "torchvision.resnet50": ("layer2", {}),
    "torchvision.wide_resnet50_2": ("layer3", {}),
    "torchvision.densenet121": ("features.transition2", {}),
    "torchvision.vgg11": ("features.0", {}),
    "torchvision.vgg11_bn": ("features.9", {}),
    "torchvision.vgg16": ("features.7", {}),
}


def _cases():
    cases = []
    for model, (one, two, three) in CHEAP.items():
        cases += [
            pytest.param(model, "instances", None, 2, None, {}, id=f"{model}-instances"),
            pytest.param(model, "tree", one, 2, None, {}, id=f"{model}-tree1"),
            pytest.param(model, "tree", two, 4, None, {}, id=f"{model}-tree2x2"),
            pytest.param(model, "tree", three, 2, EXPLICIT_BRANCHES[model], {},
                         id=f"{model}-tree{''.join(map(str, EXPLICIT_BRANCHES[model]))}"),
        ]
    cases += [pytest.param(model, "tree", split, 2, None, kwargs, id=f"{model}-tree1",
                           marks=pytest.mark.slow)  # the full tier
              for model, (split, kwargs) in EXPENSIVE.items()]
    return cases


def _check_trains(net: cs.TreeNet, x: torch.Tensor) -> None:
    """[H, B, C] logits; every trainable parameter gets a finite gradient from one backward;
    the heads leave the shared trunk's output untouched (no in-place op on the cut tensor)."""
    net.train()
    if len(net.stages) > 1:
        with torch.no_grad():
            trunk_alone = net.stages[0][0](x).clone()
    stages = net.forward_stages(x)
    out = torch.stack(stages[-1])
    if len(net.stages) > 1:
        assert torch.equal(stages[0][0], trunk_alone), "a head wrote into the shared trunk output"
    assert out.shape == (net.num_heads, x.shape[0], C)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    net.zero_grad(set_to_none=True)


def _check_exports(net: cs.TreeNet, model: str, kwargs: dict, x: torch.Tensor,
                   tmp_path) -> None:
    """Every head exports to exactly the plain model's keys and reproduces its eval logits."""
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (net.num_heads, x.shape[0], C)
    spec = backbones.parse_model_name(model, {"num_classes": C, **kwargs})
    with torch.device("meta"):  # only the keys are needed: skip allocating the weights
        fresh_keys = list(backbones.create(spec).state_dict().keys())
    plain = None
    for h in range(net.num_heads):
        assert list(net.head_state_dict(h).keys()) == fresh_keys
        path = cs.export(net, h, tmp_path / f"head{h}.safetensors")
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(fresh_keys)
            meta = f.metadata()
        assert meta["architecture"] == spec.name and meta["library"] == spec.library
        assert json.loads(meta["model_kwargs"]) == {"num_classes": C, **kwargs}
        assert meta["head"] == str(h) and meta["version"] == cs.__version__
        # the first head is rebuilt from the file's metadata alone; later heads load (strictly)
        # into that model again, which saves rebuilding the big ones
        plain = cs.load_backbone(path) if plain is None else cs.load_backbone(path, model=plain)
        assert list(plain.state_dict().keys()) == fresh_keys
        assert not plain.training
        with torch.no_grad():
            assert_same_logits(plain(x), logits[h])
        if h < net.num_heads - 1:  # the last file is read by timm below; free the disk early
            path.unlink()
    del plain
    if spec.library == "timm":
        # timm's own loader takes our file as its pretrained weights, offline
        last = net.num_heads - 1
        path = tmp_path / f"head{last}.safetensors"
        model_t = timm.create_model(model, pretrained=True, num_classes=C, **kwargs,
                                    pretrained_cfg_overlay=dict(file=str(path), num_classes=C))
        with torch.no_grad():
            assert_same_logits(model_t.eval()(x), logits[last])


@pytest.mark.parametrize("model,pattern,split,heads,branches,kwargs", _cases())
def test_every_head_trains_and_exports(model, pattern, split, heads, branches, kwargs,
                                       tmp_path):
    net = cs.wrap(model, split=split, heads=heads, pattern=pattern, branches=branches,
                  num_classes=C, input_size=SIZE, **kwargs)
    assert net.num_heads == heads
    if pattern == "instances":
        assert net.fanouts == (heads,)
    else:
        expected = branches or {2: (2,), 4: (2, 2)}[heads]
        assert net.fanouts == (1, *expected)
        assert len(net.stages) == len(split.split(",")) + 1
        assert [len(c) for c in net.stages] == [net.copies(i) for i in range(len(net.stages))]
    x = make_input()
    _check_trains(net, x)
    _check_exports(net, model, kwargs, x, tmp_path)


def test_head_paths_and_sharing_table():
    net = cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, num_classes=C,
                  input_size=SIZE)
    assert net.fanouts == (1, 2, 2)
    assert [net.head_path(h) for h in range(4)] == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 1, 3]]
    assert net.describe_heads() == [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]]]
    with pytest.raises(IndexError):
        net.head_path(4)
    assert cs.wrap("cifar_resnet20", split="layer1,layer2", heads=8, num_classes=C,
                   input_size=SIZE).fanouts == (1, 2, 4)


# --- backprop rescaling -------------------------------------------------------------------

def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def _twin(net: cs.TreeNet, model: str, split: str, heads: int, branches, rescale: str):
    other = cs.wrap(model, split=split, heads=heads, branches=branches, rescale=rescale,
                    num_classes=C, input_size=SIZE, execution="loop")
    other.load_state_dict(net.state_dict())
    return other.train()


@pytest.mark.parametrize("model,split,heads,branches", [
    ("resnet18", "layer2", 2, None),
    ("cifar_resnet20", "layer1", 4, None),
    ("cifar_resnet20", "layer1,layer2", 4, None),      # hierarchical (2, 2)
    ("torchvision.resnet18", "layer1,layer3", 2, (2, 1)),
    ("torchvision.resnet18", "layer1,layer3", 2, (1, 2)),
])
def test_backprop_rescaling_gives_each_shared_copy_the_mean_of_its_heads(
        model, split, heads, branches):
    x = make_input()
    bp = cs.wrap(model, split=split, heads=heads, branches=branches, rescale="backprop",
                 num_classes=C, input_size=SIZE, execution="loop").train()
    none = _twin(bp, model, split, heads, branches, "none")
    ref = _twin(bp, model, split, heads, branches, "none")
    bp(x).sum().backward()
    none(x).sum().backward()
    g_bp, g_none = _grads(bp), _grads(none)

    # Hand-computed reference: per-head gradients without any rescaling, each copy getting the
    # mean over the heads that run through it (1/2 per branching level along the way).
    out = ref(x)
    params = dict(ref.named_parameters())
    per_head = [dict(zip(params, torch.autograd.grad(out[h].sum(), list(params.values()),
                                                     retain_graph=True, allow_unused=True)))
                for h in range(heads)]

    for i, copies in enumerate(bp.stages):
        for c in range(len(copies)):
            under = [h for h in range(heads) if bp.head_path(h)[i] == c]
            weight = 1.0 / len(under)
            assert weight == 1.0 / math.prod(bp.fanouts[i + 1:])
            for name, _ in copies[c].named_parameters():
                key = f"stages.{i}.{c}.{name}"
                # exact: the rescaling is a power of two
                assert torch.equal(g_bp[key], g_none[key] * weight), key
                expected = sum(per_head[h][key] for h in under) * weight
                # summation order differs from one joint backward: float32 round-off
                torch.testing.assert_close(g_bp[key], expected, rtol=1e-4,
                                           atol=1e-4 * expected.abs().max().item())
                if len(under) == 1:  # head-only parameters are untouched by rescaling
                    assert torch.equal(g_bp[key], g_none[key]), key


def test_loss_rescaling_only_sets_the_loss_weight():
    # a named execution mode: auto times the modes, so two graphs may choose differently and
    # sum their gradients in another order
    nets = {r: cs.wrap("cifar_resnet20", split="layer2", heads=4, rescale=r, num_classes=C,
                       input_size=SIZE, execution="loop") for r in ("backprop", "loss", "none")}
    assert nets["loss"].loss_weight == pytest.approx(1 / 4)
    assert nets["backprop"].loss_weight == 1.0 and nets["none"].loss_weight == 1.0
    nets["none"].load_state_dict(nets["loss"].state_dict())
    x = make_input()
    for n in (nets["loss"], nets["none"]):
        n.train()(x).sum().backward()
    for (k, a), (_, b) in zip(nets["loss"].named_parameters(), nets["none"].named_parameters()):
        assert torch.equal(a.grad, b.grad), k
    with pytest.raises(cs.UserError, match="rescale"):
        cs.wrap("cifar_resnet20", split="layer2", rescale="mean", input_size=SIZE)


# --- per-head normalisation and dropout ---------------------------------------------------

def _bn_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("model,split,heads,pattern", [
    ("resnet18", "layer2", 2, "tree"),
    ("cifar_resnet20", "layer1,layer2", 4, "tree"),
    ("torchvision.mobilenet_v2", None, 2, "instances"),
])
def test_train_mode_batchnorm_statistics_stay_per_head(model, split, heads, pattern, tmp_path):
    net = cs.wrap(model, split=split, heads=heads, pattern=pattern, num_classes=C,
                  input_size=SIZE).train()
    x = make_input(batch=4)
    # Each head as a plain model, exported before the step, then stepped alone on the same x.
    plains = []
    for h in range(heads):
        plain = cs.load_backbone(cs.export(net, h, tmp_path / f"h{h}.safetensors")).train()
        with torch.no_grad():
            plain(x)
        plains.append(plain)
    with torch.no_grad():
        net(x)
    for h, plain in enumerate(plains):
        expected = _bn_buffers(plain.state_dict())
        got = _bn_buffers(net.head_state_dict(h))
        assert expected.keys() == got.keys() and expected
        for k in expected:
            assert_close_scaled(got[k], expected[k], k, rtol=FLOAT32_RTOL)
    # The leaf stage's statistics differ from head to head (different weights, different
    # inputs), and moved away from their initial zeros.
    leaves = net.stages[-1]
    means = [{k: v for k, v in leaf.state_dict().items() if k.endswith("running_mean")}
             for leaf in leaves]
    assert means[0]
    for k in means[0]:
        assert means[0][k].abs().sum() > 0
        for other in means[1:]:
            assert not torch.equal(means[0][k], other[k]), k


def test_dropout_masks_are_per_head_and_eval_is_deterministic():
    net = cs.wrap("resnet18", split="layer3", heads=2, drop_rate=0.5, num_classes=C,
                  input_size=SIZE)
    leaves = net.stages[-1]
    leaves[1].load_state_dict(leaves[0].state_dict())  # two heads with identical weights
    x = make_input(batch=4)
    net.train()
    with torch.no_grad():
        out = net(x)
    assert not torch.equal(out[0], out[1])  # independent masks
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])  # same weights, no dropout: same logits


# --- initialisation and parameter identity -------------------------------------------------

def _differs(a: nn.Module, b: nn.Module) -> None:
    """Every weight tensor of a conv or linear layer differs between two stage copies."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    weights = [k for k, v in pa.items() if v.dim() >= 2]
    assert weights
    for k in weights:
        assert pa[k] is not pb[k]
        assert not torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize("pattern,split,heads", [
    ("tree", "layer2", 2), ("tree", "layer1,layer3", 4), ("instances", None, 3)])
def test_heads_start_different_and_head0_keeps_the_given_module(pattern, split, heads):
    model = timm.create_model("resnet18", num_classes=C)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    net = cs.wrap(model, split=split, heads=heads, pattern=pattern, input_size=SIZE)
    # head 0 runs on the very parameter objects of the module passed in, unchanged
    seen = set()
    for i, copies in enumerate(net.stages):
        for name, p in copies[0].named_parameters():
            assert p is params[name], name
            seen.add(name)
        for c in range(1, len(copies)):
            _differs(copies[0], copies[c])
            for p in copies[c].parameters():
                assert all(p is not q for q in params.values())
    assert seen == set(params)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    if pattern == "instances":
        assert net.stages[0][0] is model
    # every head is a different model
    states = [net.head_state_dict(h) for h in range(heads)]
    for h in range(1, heads):
        assert not torch.equal(states[0]["fc.weight"], states[h]["fc.weight"])
        key = "layer4.0.conv1.weight"
        assert not torch.equal(states[0][key], states[h][key])


def test_named_model_copies_differ_at_every_stage():
    net = cs.wrap("torchvision.resnet18", split="layer1,layer3", heads=4, num_classes=C,
                  input_size=SIZE)
    for copies in net.stages:
        for c in range(1, len(copies)):
            _differs(copies[0], copies[c])


def test_train_and_eval_switch_every_copy():
    net = cs.wrap("resnet18", split="layer2", heads=2, num_classes=C, input_size=SIZE)
    assert net.training
    net.eval()
    assert all(not m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


# --- summary ------------------------------------------------------------------------------

@pytest.mark.slow
def test_summary_flop_ratio_resnet50_hierarchical_four_heads():
    """The paper's setting: resnet50 split layer2,layer3, 4 heads at 224 costs ~1.95x FLOPs."""
    size = (3, 224, 224)
    net = cs.wrap("resnet50", split="layer2,layer3", heads=4)
    assert net.fanouts == (1, 2, 2)
    plain = timm.create_model("resnet50")
    base, graph = costs.measure(plain, size), costs.measure(net, size)
    assert graph.flops / base.flops == pytest.approx(1.95, abs=0.02)
    # parameters: trunk once, layer3 twice, layer4 and fc four times
    p = {name: sum(q.numel() for q in m.parameters()) for name, m in plain.named_children()}
    expected = (p["conv1"] + p["bn1"] + p["layer1"] + p["layer2"] + 2 * p["layer3"]
                + 4 * (p["layer4"] + p["fc"]))
    assert graph.params == expected
    assert base.params == sum(p.values())
    assert graph.activation_bytes > base.activation_bytes


def test_summary_describe_names_stages_and_sharing():
    net = cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, num_classes=C,
                  input_size=SIZE)
    text = costs.describe(net)
    assert "4 heads" in text and "fan-outs (1, 2, 2)" in text
    assert "{0,1,2,3}" in text and "{0,1} {2,3}" in text and "{0} {1} {2} {3}" in text
    for label in ("parameters", "forward GFLOPs/image", "activations MB/image"):
        assert label in text
