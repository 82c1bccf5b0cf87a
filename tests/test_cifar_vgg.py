"""cifar_vgg11/16 (paper 004's VGG-16): a timm model with torchvision's layout and two dropouts."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import collabsurgery as cs
from collabsurgery.graphs import build_graph

NAMES = ["cifar_vgg11", "cifar_vgg16"]


def _x(batch: int = 2, chans: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


def test_vgg16_trunk_is_torchvisions_vgg16_bn() -> None:
    """Same ``features.N`` names and shapes, so a torchvision VGG-16-BN trunk loads into it."""
    ours = timm.create_model("cifar_vgg16", num_classes=100).state_dict()
    theirs = torchvision.models.vgg16_bn().state_dict()
    trunk = {k: v.shape for k, v in theirs.items() if k.startswith("features.")}
    assert trunk == {k: v.shape for k, v in ours.items() if k.startswith("features.")}
    hidden = [m for m in timm.create_model("cifar_vgg16").classifier]
    assert [type(m).__name__ for m in hidden] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU",
                                                   "Dropout", "Linear"]
    assert hidden[2].p == hidden[5].p == 0.5


@pytest.mark.parametrize("name, millions", [("cifar_vgg11", 9.76), ("cifar_vgg16", 15.25)])
def test_size_and_timm_model_api(name: str, millions: float) -> None:
    model = timm.create_model(name).eval()
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.01
    cfg = model.pretrained_cfg
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    assert model.get_classifier() is modules[cfg["classifier"]]
    x = _x()
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 1, 1)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    assert timm.create_model(name, in_chans=1, num_classes=3)(_x(2, 1)).shape == (2, 3)
    assert timm.create_model(name, num_classes=4).eval()(_x(size=64)).shape == (2, 4)
    outs = timm.create_model(name, features_only=True)(x)
    assert [o.shape[1:] for o in outs] == [(c, 32 // r, 32 // r) for c, r in
                                           [(64, 1), (128, 2), (256, 4), (512, 8), (512, 16)]]


def test_local_weight_file_round_trip(tmp_path) -> None:
    src = timm.create_model("cifar_vgg11", num_classes=7)
    path = tmp_path / "vgg.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = timm.create_model("cifar_vgg11", pretrained=True, num_classes=7,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    assert torch.equal(src.eval()(_x()), loaded.eval()(_x()))


def test_dropout_graph_samples_the_classifiers_two_dropouts(tmp_path) -> None:
    """Paper 004's VGG-16 structure: K=2 at the two classifier dropouts gives 4 views; eval is
    the plain model, and a view exports strictly into the unmodified model."""
    torch.manual_seed(0)
    views = build_graph("dropout", "cifar_vgg11", samples=2, local=["features.6"],
                        input_size=(3, 32, 32))
    assert views.config.args["split"] == ["classifier.2", "classifier.5"]
    assert views.num_heads == 4
    x = _x(4)
    logits = views.train()(x)
    assert logits.shape == (4, 4, 10) and not torch.equal(logits[0], logits[1])
    path = cs.export(views, 2, tmp_path / "vgg.safetensors")
    plain = cs.load_backbone(path).eval()
    with torch.no_grad():
        eval_logits = views.eval()(x)
        assert all(torch.equal(eval_logits[h], plain(x)) for h in range(4))
