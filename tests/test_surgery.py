"""Split points: which names are listed, that a name's node is the module's output, bad
splits are clear errors, and the in-place trap at a cut."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import collabsurgery as cs

from helpers import assert_same_logits, make_input

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (3, 32, 32)


@pytest.mark.parametrize("model,present,absent", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"],
     ["layer1.0.conv1", "layer1.0.bn1", "layer2.0.downsample", "layer1.0.act1", "fc"]),
    ("torchvision.resnet50", ["layer1", "layer2.0", "layer2", "layer3.4", "layer3", "layer4"],
     ["layer1.0.conv1", "layer1.0.conv3", "layer1.0.downsample.0", "layer1.0.relu", "fc"]),
    ("densenet121", ["features.denseblock1", "features.transition1", "features.denseblock2",
                     "features.transition2", "features.denseblock3", "features.transition3",
                     "features.denseblock4"],
     ["features.denseblock1.denselayer1", "features.denseblock1.denselayer1.conv1",
      "features.denseblock2.denselayer3"]),
    ("torchvision.densenet121", ["features.denseblock1", "features.transition1",
                                 "features.denseblock2", "features.transition3"],
     ["features.denseblock1.denselayer1", "features.denseblock3.denselayer2.norm1"]),
    ("mobilenetv2_100", ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5"],
     ["blocks.2.1.conv_pw", "blocks.3.1.bn1", "blocks.4.1.conv_dw", "blocks.2.1.conv_pwl"]),
    ("torchvision.mobilenet_v2", [f"features.{i}" for i in range(17)],
     ["features.2.conv.3", "features.3.conv.0", "features.5.conv.1.0"]),
    # features.20 (the last pool) is the same node as 'features', which is listed instead
    ("torchvision.vgg11", [f"features.{i}" for i in range(20)] + ["features"],
     ["features.20", "classifier.6"]),
    ("cifar_resnet20", ["layer1", "layer2", "layer3"], ["layer1.0.conv1", "layer2.1.bn2"]),
    ("cifar_densenet40_12", ["dense1", "trans1", "dense2", "trans2", "dense3"],
     ["dense1.0", "dense1.3.conv1"]),
])
def test_splits_lists_block_boundaries_not_insides(model, present, absent):
    points = cs.splits(model, input_size=SIZE, num_classes=10)
    assert len(points) == len(set(points))
    for name in present:
        assert name in points, name
    for name in absent:
        assert name not in points, name
    # execution order
    order = [points.index(n) for n in present]
    assert order == sorted(order)


def test_splits_default_input_size_and_module():
    model = torchvision.models.resnet18(num_classes=10)
    assert cs.splits(model) == cs.splits("torchvision.resnet18", input_size=(3, 224, 224))


def _hooked_outputs(model, names, x):
    """Eval-mode output of each named module, via forward hooks (cloned: later in-place ops)."""
    found = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: found.__setitem__(n, o.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


@pytest.mark.parametrize("factory,names", [
    (lambda: timm.create_model("resnet18", num_classes=10),
     ["maxpool", "layer1.0", "layer2", "layer3.0", "layer4"]),
    (lambda: torchvision.models.densenet121(num_classes=10),
     ["features.pool0", "features.denseblock1", "features.transition1.conv",
      "features.transition2", "features.denseblock4"]),
    (lambda: torchvision.models.mobilenet_v2(num_classes=10),
     ["features.1", "features.4", "features.11", "features.17"]),
    (lambda: timm.create_model("cifar_densenet40_12", num_classes=10),
     ["dense1", "trans1", "dense3"]),
    (lambda: timm.create_model("mobilenetv2_100", num_classes=10),
     ["bn1", "blocks.1", "blocks.3.1", "blocks.5"]),
])
def test_split_node_is_the_module_output(factory, names):
    """Each split point's stage output equals a forward hook's output on that module."""
    model = factory()
    x = make_input()
    expected = _hooked_outputs(model, names, x)
    net = cs.wrap(model, split=names, heads=1, input_size=SIZE, rescale="none").eval()
    assert net.fanouts == (1,) * (len(names) + 1)
    with torch.no_grad():
        stages = net.forward_stages(x)
    for name, outputs in zip(names, stages):
        assert len(outputs) == 1
        assert torch.equal(outputs[0], expected[name]), name
    with torch.no_grad():
        assert torch.equal(stages[-1][0], model(x))


@pytest.mark.slow
def test_inplace_relu_after_the_cut_does_not_corrupt_siblings():
    """torchvision VGG: ReLU(inplace=True) right after the cut conv must not write into the
    tensor all heads share, and backward must work through every head. rescale='none' hands
    the very cut tensor to every head (no gradient-scaling view in between); the matrix in
    test_graphs.py checks the default rescaling with every VGG split before an in-place ReLU."""
    rescale = "none"
    model = torchvision.models.vgg11(num_classes=10)
    assert isinstance(model.features[1], torch.nn.ReLU) and model.features[1].inplace
    x = make_input()
    expected = _hooked_outputs(model, ["features.0"], x)["features.0"]
    net = cs.wrap(model, split="features.0", heads=2, rescale=rescale, input_size=SIZE)
    assert model.features[1].inplace  # the user's model is not modified
    for mode in (False, True):
        net.train(mode)
        with torch.no_grad():
            trunk_alone = net.stages[0][0](x).clone()
        assert torch.equal(trunk_alone, expected)
        stages = net.forward_stages(x)
        assert torch.equal(stages[0][0], trunk_alone), "a head wrote into the shared cut tensor"
        assert (stages[0][0] < 0).any()  # still the conv output, not ReLU'd in place
        logits = torch.stack(stages[-1])
        assert logits.shape == (2, 2, 10)
        if mode:
            logits.sum().backward()
            for name, p in net.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            net.zero_grad()
    # head 1's eval logits are those of a plain VGG with its weights (in-place ReLU and all)
    net.eval()
    plain = torchvision.models.vgg11(num_classes=10).eval()
    plain.load_state_dict(net.head_state_dict(1))
    with torch.no_grad():
        assert_same_logits(plain(x), net(x)[1])


# --- bad split requests --------------------------------------------------------------------

@pytest.mark.parametrize("model,split,heads,kwargs,match", [
    ("resnet18", "layer1.0.conv1", 2, {}, r"invalid split point 'layer1\.0\.conv1'.*"
     r"valid split points: .*layer1, .*layer2"),
    ("densenet121", "features.denseblock1.denselayer1", 2, {},
     r"invalid split point 'features\.denseblock1\.denselayer1'.*features\.transition1"),
    ("resnet18", "layer9", 2, {}, r"'layer9' \(no such module or node\).*layer3"),
    ("resnet18", "layer2", 0, {}, r"heads must be an integer >= 1, got 0"),
    ("resnet18", "layer1,layer3", 4, {"branches": (2, 3)},
     r"branches \(2, 3\).*multiply to heads=4"),
    ("resnet18", "layer1,layer3", 4, {"branches": (4,)}, r"one fan-out per split point"),
    ("resnet18", "layer1,layer3", 3, {}, r"heads=3 cannot be spread"),
    ("resnet18", "layer3,layer1", 4, {}, r"execution order"),
    ("resnet18", "layer2,layer2", 4, {}, r"distinct"),
    ("resnet18", "layer2", 2, {"pattern": "instances"}, r"'instances' takes no split points"),
    ("resnet18", None, 2, {}, r"needs split points; valid split points: conv1.*layer4"),
    ("resnet18", "layer2", 2, {"pattern": "ring"},
     r"unknown pattern 'ring'; valid: tree, instances"),
    ("resnet1800", "layer2", 2, {}, r"unknown model 'resnet1800' \(did you mean resnet18"),
    ("torchvision.resnet1800", "layer2", 2, {}, r"unknown torchvision model 'resnet1800'"),
])
def test_bad_wrap_arguments_are_one_line_user_errors(model, split, heads, kwargs, match):
    with pytest.raises(cs.UserError, match=match) as info:
        cs.wrap(model, split=split, heads=heads, input_size=SIZE, num_classes=10, **kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_model_arguments():
    with pytest.raises(cs.UserError, match="rejected its arguments"):
        cs.splits("resnet18", input_size=SIZE, no_such_kwarg=1)
    with pytest.raises(cs.UserError, match="only apply to a model given by name"):
        cs.wrap(timm.create_model("resnet18"), split="layer2", num_classes=10, input_size=SIZE)
    with pytest.raises(cs.UserError, match="probe input"):
        cs.splits("resnet18", input_size=(5, 32, 32))
