"""Models that broke surgery in a timm/torchvision sweep (issue 12, item 5).

- Surgery leaves the user's model bit-identical, buffers included: ConViT replaces a
  non-persistent buffer during a forward at another size, which a copy-back restore corrupted.
- A ConViT head exports exactly (it trained a different function from the one exported).
- torchvision MNASNet loads back (its loader needs module versions a safetensors file lacks).
- A model whose training output is not one tensor is refused in one line (googlenet).
- A model with no clean split point says so and points at pattern='instances'.
- ViT and Hiera cut between blocks (optional forward arguments traced at their defaults).
- A wrong input size names the model's own.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.errors import UserError
from collabsurgery.measure.costs import measure

from helpers import assert_same_logits, calibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_identical(model: torch.nn.Module, twin: torch.nn.Module) -> None:
    """Same buffers (persistent or not: names, shapes, values) and parameters, bit for bit."""
    for a, b in ((model.named_buffers(), twin.named_buffers()),
                 (model.named_parameters(), twin.named_parameters())):
        a, b = dict(a), dict(b)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("name,size,split", [
    pytest.param("convit_tiny", 224, "blocks.5", marks=pytest.mark.slow),  # 224 px: full tier
    ("resnet18", 64, "layer2"),
    ("torchvision.mobilenet_v2", 64, "features.7"),
    ("efficientnet_b0", 64, "blocks.3"),
])
def test_surgery_leaves_the_source_model_bit_identical(name, size, split):
    model = (torchvision.models.get_model(name.split(".", 1)[1], weights=None)
             if name.startswith("torchvision.") else timm.create_model(name, pretrained=False))
    model.eval()
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, size, size)
    cs.splits(model, input_size=(3, size, size))
    measure(cs.wrap(model, split=split, heads=2, input_size=(3, size, size)), (3, size, size))
    assert_identical(model, twin)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_a_convit_head_exports_exactly(tmp_path):
    net = cs.wrap("convit_tiny", split="blocks.5", heads=2, num_classes=10)
    net.eval()
    x = torch.randn(2, 3, 224, 224)
    path = cs.export(net, 1, tmp_path / "convit.safetensors")
    with torch.no_grad():
        assert_same_logits(cs.load_backbone(path)(x), net(x)[1])


def test_mnasnet_exports_and_loads_back(tmp_path):
    net = cs.wrap("torchvision.mnasnet0_5", split="layers.8", heads=2, num_classes=10,
                  input_size=(3, 64, 64))
    calibrate_batchnorm(net, 64)
    net.eval()
    path = cs.export(net, 0, tmp_path / "mnasnet.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same_logits(cs.load_backbone(path)(x), net(x)[0])


def test_a_model_with_auxiliary_outputs_is_refused_in_one_line():
    with pytest.raises(UserError, match="returns GoogLeNetOutputs, not one tensor of logits, "
                                        "in training mode.*aux_logits=False"):
        cs.wrap("torchvision.googlenet", split="inception4a", heads=2, num_classes=10,
                input_size=(3, 64, 64))
    net = cs.wrap("torchvision.googlenet", split="inception4a", heads=2, num_classes=10,
                  aux_logits=False, input_size=(3, 64, 64))
    assert net.train()(torch.randn(2, 3, 64, 64)).shape == (2, 2, 10)


def test_a_model_without_split_points_says_so(capsys):
    assert cli.main(["splits", "crossvit_tiny_240"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no clean split point" in err
    assert "pattern='instances'" in err
    with pytest.raises(UserError, match="valid split points: none: .*pattern='instances'"):
        cs.wrap("crossvit_tiny_240", split="blocks.0", heads=2)


@pytest.mark.parametrize("name,split", [  # ViTs at 224 px: the full tier
    pytest.param("vit_tiny_patch16_224", "blocks.5", marks=pytest.mark.slow),
    pytest.param("hiera_tiny_224", "blocks.6", marks=pytest.mark.slow)])
def test_optional_forward_arguments_do_not_block_cuts_between_blocks(name, split, tmp_path):
    """ViT's attn_mask/is_causal and Hiera's mask are traced at their defaults, so every block
    boundary is a clean cut (CL-ILR splits a ViT at blocks.N)."""
    points = cs.splits(name)
    assert {f"blocks.{i}" for i in range(1, 10)} <= set(points)
    net = cs.wrap(name, split=split, heads=2, num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    net(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in net.parameters() if p.requires_grad)
    net.eval()
    path = cs.export(net, 1, tmp_path / "head1.safetensors")
    with torch.no_grad():
        assert_same_logits(cs.load_backbone(path)(x), net(x)[1])


@pytest.mark.slow  # swinv2 at 224 px: the full tier
def test_a_wrong_input_size_names_the_models_own(capsys):
    assert cli.main(["wrap", "swinv2_tiny_window8_256", "--split", "layers.2",
                     "--input-size", "224"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "its own input size is 3x256x256" in err
    points = cs.splits("swinv2_tiny_window8_256")  # no size given: the model's own 256
    assert "layers.2" in points
