"""Export: metadata, ready modules, bad files are clear errors, atomic writes, graph files.

The per-backbone round trip of every head lives in test_graphs.py's matrix."""
from __future__ import annotations

import importlib
import json
import os

import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import collabsurgery as cs
from collabsurgery.common.integrity import tensors_sha256
from collabsurgery.graphs.saving import load_graph, save_graph

from helpers import assert_same_logits, make_input

pytestmark = pytest.mark.usefixtures("one_thread")

tensorfile = importlib.import_module("collabsurgery.common.tensorfile")

C = 10
SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def net():
    return cs.wrap("cifar_resnet20", split="layer1,layer2", heads=4, num_classes=C,
                   input_size=SIZE).eval()


@pytest.fixture(scope="module")
def good_file(net, tmp_path_factory):
    return cs.export(net, 2, tmp_path_factory.mktemp("good") / "head2.safetensors")


def _listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_metadata_is_strings_with_recipe_and_metrics(net, tmp_path):
    path = cs.export(net, 3, tmp_path / "sub" / "dir" / "h3.safetensors",
                     extra_metadata={"recipe": "name: x\n", "metrics": {"test_acc": 0.5}})
    assert path == tmp_path / "sub" / "dir" / "h3.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    checksum = meta.pop("sha256")
    assert checksum == tensors_sha256(load_file(str(path)), meta)
    assert meta == {"format": "collabsurgery.backbone/1", "architecture": "cifar_resnet20",
                    "library": "timm", "model_kwargs": json.dumps({"num_classes": C}),
                    "head": "3", "version": cs.__version__, "recipe": "name: x\n",
                    "metrics": json.dumps({"test_acc": 0.5})}
    # no pickle anywhere: the file is an 8-byte header length, a JSON header, raw tensors
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {**meta, "sha256": checksum}
    assert _listing(path.parent) == ["h3.safetensors"]


def test_export_is_a_snapshot_of_the_weights(net, tmp_path):
    path = cs.export(net, 0, tmp_path / "h0.safetensors")
    before = load_file(str(path))
    with torch.no_grad():
        net.stages[0][0].conv1.weight.add_(1.0)
    try:
        assert torch.equal(load_file(str(path))["conv1.weight"], before["conv1.weight"])
        assert not torch.equal(net.head_state_dict(0)["conv1.weight"], before["conv1.weight"])
    finally:
        with torch.no_grad():
            net.stages[0][0].conv1.weight.sub_(1.0)


def test_export_a_ready_module_needs_a_module_to_load_into(tmp_path):
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, C)
            self.never_called = nn.Linear(2, 2)  # in the state_dict, never in forward

        def forward(self, x):
            return self.fc(self.pool(self.conv2(self.act(self.bn(self.conv(x))))).flatten(1))

    net = cs.wrap(Small(), split="bn", heads=2, input_size=SIZE).eval()
    x = make_input()
    with torch.no_grad():
        logits = net(x)
    path = cs.export(net, 1, tmp_path / "small.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["library"] == "module"
        assert f.metadata()["architecture"] == "Small"
    assert list(load_file(str(path))) and set(load_file(str(path))) == set(Small().state_dict())
    with pytest.raises(cs.UserError, match="pass model= to load it"):
        cs.load_backbone(path)
    model = cs.load_backbone(path, model=Small())
    assert list(model.state_dict()) == list(Small().state_dict())
    with torch.no_grad():
        assert_same_logits(model(x), logits[1])
    with pytest.raises(cs.UserError, match="only a training graph wrapped from a model name"):
        save_graph(net, tmp_path / "graph.safetensors")


def test_load_backbone_kwargs_override_and_mismatch(good_file):
    with pytest.raises(cs.UserError, match="does not fit the model") as info:
        cs.load_backbone(good_file, num_classes=5)
    assert "\n" not in str(info.value)
    model = cs.load_backbone(good_file, drop_rate=0.0)  # a compatible override
    assert model.num_classes == C


# --- bad files -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,match", [
    ("missing", r"no such file"),
    ("directory", r"no such file"),
    ("text", r"not a readable safetensors file.*valid: a file written by collabsurgery export"),
    ("foreign", r"no format=collabsurgery.backbone/1 metadata"),
    ("foreign_metadata", r"no format=collabsurgery.backbone/1 metadata"),
    ("truncated", r"(not a readable safetensors file|truncated or corrupt)"),
    ("truncated_header", r"not a readable safetensors file"),
    ("empty", r"not a readable safetensors file"),
    ("graph", r"no format=collabsurgery.backbone/1 metadata"),
])
def test_load_backbone_rejects_files_that_are_not_our_exports(kind, match, good_file, net,
                                                             tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "foreign":
        save_file({"conv1.weight": torch.zeros(3)}, str(path))
    elif kind == "foreign_metadata":
        save_file({"conv1.weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    elif kind == "truncated":
        data = good_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_header":
        path.write_bytes(good_file.read_bytes()[:100])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "graph":
        save_graph(net, path)
    with pytest.raises(cs.UserError, match=match) as info:
        cs.load_backbone(path)
    assert "\n" not in str(info.value)


def test_load_backbone_rejects_a_corrupt_tensor_section(good_file, tmp_path):
    """Header intact, data cut short: the header check passes, reading the tensors must not."""
    data = good_file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: header_end + 16])
    with pytest.raises(cs.UserError) as info:
        cs.load_backbone(path)
    assert "\n" not in str(info.value)


# --- failed exports leave nothing behind ---------------------------------------------------

@pytest.mark.parametrize("head", [4, -1, 10, "1", 1.0, None])
def test_export_of_a_head_out_of_range_writes_nothing(net, head, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    before = _listing(tmp_path)
    with pytest.raises(cs.UserError, match=r"out of range; valid: 0\.\.3"):
        cs.export(net, head, tmp_path / "out.safetensors")
    assert _listing(tmp_path) == before


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_export(net, good_file, tmp_path,
                                                                  monkeypatch):
    target = tmp_path / "backbone.safetensors"
    target.write_bytes(good_file.read_bytes())
    before = _listing(tmp_path)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorfile, "save_file", disk_full)
    with pytest.raises(OSError, match="no space left on the device for export") as info:
        cs.export(net, 0, target)
    assert isinstance(info.value, cs.UserError) and "\n" not in str(info.value)  # one line, exit 2
    assert _listing(tmp_path) == before  # no .backbone.safetensors.*.tmp left behind
    monkeypatch.undo()
    reloaded = cs.load_backbone(target)  # the previous export is intact
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, net.head_state_dict(2)[k]), k


def test_export_to_a_directory_or_under_a_file_is_a_user_error(net, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    with pytest.raises(cs.UserError, match="is a directory"):
        cs.export(net, 0, tmp_path / "out")
    with pytest.raises(cs.UserError, match="cannot write"):
        cs.export(net, 0, tmp_path / "afile" / "x.safetensors")
    assert _listing(tmp_path) == before
    assert _listing(tmp_path / "out") == []


# --- whole training graphs -----------------------------------------------------------------

@pytest.mark.parametrize("model,split,heads,pattern,branches", [
    ("cifar_resnet20", "layer1,layer2", 4, "tree", None),
    ("torchvision.resnet18", "layer1,layer3", 2, "tree", (1, 2)),
    ("mobilenetv2_100", None, 2, "instances", None),
])
def test_graph_file_round_trip(model, split, heads, pattern, branches, tmp_path):
    net = cs.wrap(model, split=split, heads=heads, pattern=pattern, branches=branches,
                  rescale="loss", num_classes=C, input_size=SIZE)
    x = make_input()
    with torch.no_grad():
        net(x)  # move the BatchNorm statistics away from their initial values
    net.eval()
    path = save_graph(net, tmp_path / "graph.safetensors")
    assert _listing(tmp_path) == ["graph.safetensors"]
    loaded = load_graph(path)
    assert loaded.config == net.config
    assert (loaded.fanouts, loaded.rescale, loaded.loss_weight) == \
        (net.fanouts, net.rescale, net.loss_weight)
    assert list(loaded.state_dict()) == list(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    for h in range(heads):
        a, b = loaded.head_state_dict(h), net.head_state_dict(h)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_graph_rejects_a_backbone_export(good_file):
    with pytest.raises(cs.UserError, match="no format=collabsurgery.graph/1"):
        load_graph(good_file)


def test_timm_loads_an_export_of_a_torchvision_name_only_via_load_backbone(tmp_path):
    net = cs.wrap("torchvision.resnet18", split="layer3", heads=2, num_classes=C,
                  input_size=SIZE).eval()
    path = cs.export(net, 1, tmp_path / "tv.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["library"] == "torchvision"
        assert f.metadata()["architecture"] == "resnet18"
    model = cs.load_backbone(path)
    assert type(model).__module__.startswith("torchvision")
    x = make_input()
    with torch.no_grad():
        assert_same_logits(model(x), net(x)[1])
    assert timm.is_model("resnet18")  # the same short name exists in timm: library decides
