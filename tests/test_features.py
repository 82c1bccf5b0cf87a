"""An export loads as a feature extractor without its classifier (issue 12, item 1).

The feature maps equal the training graph's head at its cuts, bit for bit, for timm (timm's own
features_only machinery) and torchvision (levels found by surgery, torchvision's
create_feature_extractor); bad requests are one-line UserErrors.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.models import VisionTransformer

import collabsurgery as cs
from collabsurgery.common.tensorfile import load_state
from collabsurgery.errors import UserError
from collabsurgery.export.features import feature_levels

from helpers import calibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Head 2 of a 4-head hierarchical ResNet-18 (layer2, layer3) per library, BN calibrated."""
    folder = tmp_path_factory.mktemp("features")
    made = {}
    for name in ("resnet18", "torchvision.resnet18"):
        torch.manual_seed(0)
        net = cs.wrap(name, split="layer2,layer3", heads=4, num_classes=10, input_size=SIZE)
        calibrate_batchnorm(net, SIZE[1])
        made[name] = net.eval(), cs.export(net, head=2, path=folder / f"{name}.safetensors")
    return made


@pytest.mark.parametrize("name", ["resnet18", "torchvision.resnet18"])
def test_feature_maps_equal_the_training_graphs_head_at_its_cuts(exports, name):
    net, path = exports[name]
    extractor = cs.load_backbone(path, features_only=True)
    info = extractor.feature_info
    stem = "act1" if name == "resnet18" else "relu"
    assert info.module_name() == [stem, "layer1", "layer2", "layer3", "layer4"]
    assert info.channels() == [64, 64, 128, 256, 512]
    assert info.reduction() == [2, 4, 8, 16, 32]
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        maps = extractor(x)
        graph = net.run(x, wants=("layer2", "layer3")).features
    assert [tuple(m.shape[1:]) for m in maps][2:] == [(128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert torch.equal(maps[2], graph["layer2"][2])
    assert torch.equal(maps[3], graph["layer3"][2])


@pytest.mark.parametrize("name", ["resnet18", "torchvision.resnet18"])
def test_the_extractor_holds_the_export_without_its_classifier(exports, name):
    _, path = exports[name]
    exported = load_state(path)
    extractor = cs.load_backbone(path, features_only=True, out_indices=(1, 3))
    assert extractor.feature_info.module_name() == ["layer1", "layer3"]
    state = {k.removeprefix("body."): v for k, v in extractor.state_dict().items()}
    # what is left out is the classifier (from the model's config) and what follows the last
    # level asked for, nothing else
    assert not any(k.startswith(("fc.", "layer4.")) for k in state)
    assert set(state) == {k for k in exported if not k.startswith(("fc.", "layer4."))}
    assert all(torch.equal(state[k], exported[k]) for k in state)


def test_torchvision_levels_are_block_outputs(tmp_path):
    net = cs.wrap("torchvision.mobilenet_v2", split="features.7", heads=2, num_classes=10,
                  input_size=SIZE)
    path = cs.export(net, head=1, path=tmp_path / "mnv2.safetensors")
    extractor = cs.load_backbone(path, features_only=True, out_indices=(-3, -2, -1))
    assert extractor.feature_info.module_name() == ["features.6", "features.13", "features"]
    assert extractor.feature_info.reduction() == [8, 16, 32]
    assert [m.shape[1] for m in extractor(torch.randn(1, *SIZE))] == [32, 96, 1280]
    assert not any("classifier" in k for k in extractor.state_dict())


def test_bad_feature_requests_are_one_line_errors(exports, tmp_path):
    _, path = exports["torchvision.resnet18"]
    with pytest.raises(UserError, match=r"out_indices \(7,\) out of range .* valid: 0\.\.4"):
        cs.load_backbone(path, features_only=True, out_indices=(7,))
    with pytest.raises(UserError, match="out_indices needs features_only=True"):
        cs.load_backbone(path, out_indices=(1,))
    _, timm_path = exports["resnet18"]
    with pytest.raises(UserError, match="timm cannot build resnet18 with features_only=True"):
        cs.load_backbone(timm_path, features_only=True, out_indices=(9,))
    # a ViT's patch embedding is a map, but tokens follow it: no levels, so a refusal
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                            hidden_dim=16, mlp_dim=16)
    assert feature_levels(vit, "vit") == []
    module = cs.wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)),
                     pattern="instances", heads=1, input_size=(3, 2, 2))
    module_path = cs.export(module, head=0, path=tmp_path / "module.safetensors")
    with pytest.raises(UserError, match="feature extraction needs a timm or torchvision"):
        cs.load_backbone(module_path, features_only=True)
