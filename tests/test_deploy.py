"""Deployment artifacts (collabsurgery.export.deploy / artifact): ONNX and torch.export of a
head equal its logits (onnxruntime, torch.export.load) at batch 1 and 5, carry the
preprocessing, and bad input is one line with nothing written.

Trained runs come from the tiny recipe (tests/helpers.py) stopped after 2 steps; the fast tier
trains a timm ResNet, the slow tier a torchvision MobileNetV2 and a timm ViT.
"""
from __future__ import annotations

import json
import os
import sys
import zipfile

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from timm.layers import register_notrace_module

import collabsurgery as cs
from collabsurgery.errors import UserError
from collabsurgery.export import deploy, export_metadata
from collabsurgery.export.artifact import export_artifact
from collabsurgery.export.from_run import load_run
from collabsurgery.export.model_folder import ONNX_FILE, save_timm_folder
from collabsurgery.graphs.saving import save_graph

from helpers import (assert_close_scaled, calibrate_batchnorm, make_input, one_line,
                     one_line_error, run_cli, tiny_recipe)

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")

onnxruntime = pytest.importorskip("onnxruntime")
C = 5
SIZE = 48  # at 32 px MobileNetV2's 1x1 maps make calibrated BatchNorm ill-conditioned


def ort_logits(path, x: torch.Tensor) -> list[torch.Tensor]:
    """Every output of an ONNX file on ``x``, by onnxruntime on the CPU."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(y) for y in session.run(None, {"input": x.numpy()})]


def program_logits(path, x: torch.Tensor) -> torch.Tensor:
    """The output of a torch.export archive on ``x``, as a deployment loads it."""
    with open(path, "rb") as f:
        return torch.export.load(f).module()(x)


def assert_equal_at_batches(path, reference: nn.Module | callable, size: int) -> None:
    """The artifact at ``path`` gives ``reference``'s logits at batch 1 and 5."""
    for batch in (1, 5):
        x = make_input(batch, size, seed=10 + batch)
        with torch.no_grad():
            expected = reference(x)
            got = program_logits(path, x) if zipfile.is_zipfile(path) else \
                ort_logits(path, x)[0]  # a torch.export archive is a zip file
        assert got.shape == expected.shape == (batch, expected.shape[1])
        assert_close_scaled(got, expected, f"{path.name} at batch {batch}", rtol=1e-4)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------- trained runs

def train_tiny(root, *overrides: str):
    """A tiny run (2 optimizer steps) of the given model overrides; returns its directory."""
    from collabsurgery.train import engine

    return engine.train(tiny_recipe(root, "train.max_steps=2", "train.epochs=1", *overrides))


def head_of_run(run_dir, head: int):
    """The run's graph (eval mode) computing head ``head``'s logits."""
    net, _ = load_run(run_dir)
    return lambda x: net(x)[head]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs"), "model.name=resnet18")


@pytest.mark.parametrize("format, name", [("onnx", "r18.onnx"), ("torch-export", "r18.pt2")])
def test_cli_exports_a_trained_timm_resnet_head(resnet_run, format, name, tmp_path, capsys):
    out = tmp_path / name
    assert run_cli(["export", resnet_run, "--head", "1", "--format", format, "-o", out]) == 0
    printed = capsys.readouterr().out
    assert f"exported head 1 to {out}" in printed and "max abs diff" in printed
    assert listing(tmp_path) == [name]  # no temporary file left beside it
    assert_equal_at_batches(out, head_of_run(resnet_run, 1), 16)
    meta = deploy.read_metadata(out)
    recipe = yaml.safe_load(meta["recipe"])
    assert (meta["architecture"], meta["library"], meta["head"]) == ("resnet18", "timm", "1")
    assert meta["run"] == resnet_run.name and recipe["model"]["name"] == "resnet18"
    assert (meta["input_names"], meta["output_names"]) == ("input", "logits")
    # the run's evaluation transform: 16 px, shorter side resized (bilinear), centre crop
    assert json.loads(meta["input_size"]) == [3, 16, 16]
    assert (meta["interpolation"], meta["crop_pct"], meta["crop_mode"]) == ("bilinear", "1",
                                                                             "center")
    source = json.loads(meta["preprocessing_source"])
    assert source["input_size"] == source["interpolation"] == source["crop_pct"] == "recipe"
    assert "training split" in source["mean_std"] and len(json.loads(meta["mean"])) == 3


def test_torch_export_archive_holds_no_pickle(resnet_run, tmp_path):
    out = tmp_path / "r18.pt2"
    assert run_cli(["export", resnet_run, "--head", "1", "--format", "torch-export",
                    "-o", out]) == 0
    with zipfile.ZipFile(out) as archive:  # JSON and raw tensor bytes; no example inputs
        samples = [n for n in archive.namelist() if "sample_inputs" in n]
        assert all(archive.read(n) == b"" for n in samples)
        assert any(n.endswith("models/model.json") for n in archive.namelist())


def test_onnx_opset_is_selectable(resnet_run, tmp_path, capsys):
    import onnx

    out = tmp_path / "r18-18.onnx"
    assert run_cli(["export", resnet_run, "--head", "0", "--format", "onnx", "--opset", "18",
                    "-o", out]) == 0
    assert "ONNX opset 18" in capsys.readouterr().out
    proto = onnx.load(str(out))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch
    assert_equal_at_batches(out, head_of_run(resnet_run, 0), 16)


def test_an_opset_the_exporter_does_not_reach_is_refused(resnet_run, tmp_path, capsys):
    """torch 2.14's exporter writes opset 18 and converts down where the model allows; a file
    in another opset than asked for is refused, never kept silently."""
    out = tmp_path / "r18-7.onnx"
    assert run_cli(["export", resnet_run, "--head", "0", "--format", "onnx", "--opset", "7",
                    "-o", out]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "not the 7 asked for" in line or "opset" in line
    assert listing(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("model, overrides", [
    ("torchvision.mobilenet_v2", ["model.name=torchvision.mobilenet_v2",
                                  "graph.split=[features.3]"]),
    ("test_vit", ["model.name=test_vit", "model.kwargs={img_size: 16, patch_size: 8}",
                  "graph.split=[blocks.2]"]),
])
def test_cli_exports_trained_mobilenet_and_vit_heads(model, overrides, tmp_path, capsys):
    run_dir = train_tiny(tmp_path / "runs", *overrides)
    for format, name in (("onnx", "h.onnx"), ("torch-export", "h.pt2")):
        out = tmp_path / name
        assert run_cli(["export", run_dir, "--head", "1", "--format", format, "-o", out]) == 0
        assert_equal_at_batches(out, head_of_run(run_dir, 1), 16)
        assert deploy.read_metadata(out)["architecture"] == model.split(".")[-1]


# ---------------------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def peers():
    """A peer group: a timm ResNet and a torchvision MobileNetV2, BatchNorm calibrated."""
    net = cs.wrap(["resnet18", "torchvision.mobilenet_v2"], pattern="peers", num_classes=C,
                  input_size=(3, SIZE, SIZE))
    calibrate_batchnorm(net, SIZE)  # initial statistics would make comparisons vacuous
    return net.eval()


@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_a_peer_groups_student_exports_as_its_own_architecture(peers, format, tmp_path):
    path = cs.export(peers, 1, tmp_path / "mnv2.bin", format=format)
    assert path == tmp_path / "mnv2.bin" and listing(tmp_path) == ["mnv2.bin"]
    assert_equal_at_batches(path, lambda x: peers(x)[1], SIZE)
    meta = deploy.read_metadata(path)
    assert (meta["architecture"], meta["library"], meta["head"]) == ("mobilenet_v2",
                                                                     "torchvision", "1")
    # a graph without a recipe: its input size; the torchvision model's own transforms
    assert json.loads(meta["input_size"]) == [3, SIZE, SIZE]
    assert (meta["interpolation"], meta["crop_pct"]) == ("bilinear", "0.875")
    assert json.loads(meta["preprocessing_source"])["input_size"] == "graph"


def test_vit_head_exports_to_onnx_and_torch_export(tmp_path):
    net = cs.wrap("test_vit", split="blocks.2", heads=2, num_classes=C, img_size=SIZE,
                  patch_size=8, input_size=(3, SIZE, SIZE)).eval()
    for format, name in (("onnx", "vit.onnx"), ("torch-export", "vit.pt2")):
        path = cs.export(net, 0, tmp_path / name, format=format)
        assert_equal_at_batches(path, lambda x: net(x)[0], SIZE)
        meta = deploy.read_metadata(path)
        assert meta["interpolation"] == timm.create_model("test_vit").pretrained_cfg[
            "interpolation"]  # timm's data config of the model


@pytest.fixture(scope="module")
def resnet_export(peers, tmp_path_factory):
    return cs.export(peers, 0, tmp_path_factory.mktemp("export") / "r18.safetensors")


@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_features_only_equals_load_backbone_features(resnet_export, format, tmp_path):
    path = export_artifact(resnet_export, tmp_path / "features.bin", format,
                           input_size=(3, SIZE, SIZE), features_only=True).path
    features = cs.load_backbone(resnet_export, features_only=True)
    meta = deploy.read_metadata(path)
    names = [f"features.{i}" for i in range(len(features.feature_info))]
    assert meta["output_names"] == ",".join(names) and meta["features_only"] == "true"
    assert json.loads(meta["feature_channels"]) == features.feature_info.channels()
    for batch in (1, 5):
        x = make_input(batch, SIZE, seed=batch)
        with torch.no_grad():
            expected = features(x)
        got = ort_logits(path, x) if format == "onnx" else program_logits(path, x)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_close_scaled(g, e, "feature map", rtol=1e-4)


def test_torchvision_features_only_onnx(peers, tmp_path):
    export = cs.export(peers, 1, tmp_path / "mnv2.safetensors")
    path = export_artifact(export, tmp_path / "f.onnx", "onnx", input_size=(3, SIZE, SIZE),
                           features_only=True).path
    features = cs.load_backbone(export, features_only=True)
    x = make_input(5, SIZE)
    with torch.no_grad():
        expected = features(x)
    for g, e in zip(ort_logits(path, x), expected, strict=True):
        assert_close_scaled(g, e, "feature map", rtol=1e-4)


def test_timm_folder_with_onnx_beside_the_weights(resnet_export, tmp_path):
    seen = []
    folder = save_timm_folder(resnet_export, tmp_path / "r18", onnx=True, on_onnx=seen.append)
    assert listing(folder) == sorted(["README.md", "config.json", "model.safetensors",
                                      ONNX_FILE])
    model = cs.load_backbone(resnet_export)
    assert_equal_at_batches(folder / ONNX_FILE, model, 224)  # no recipe: the model's size
    card = (folder / "README.md").read_text()
    assert "## ONNX" in card and f"max abs diff {seen[0].max_abs_diff:.3g}" in card


def test_cli_timm_folder_onnx(tmp_path, capsys):
    net = cs.wrap("resnet18", split="layer2", heads=2, num_classes=C,
                  input_size=(3, SIZE, SIZE)).eval()
    graph = save_graph(net, tmp_path / "g.safetensors")
    out = tmp_path / "folder"
    assert run_cli(["export", graph, "--head", "1", "--format", "timm-folder", "--onnx",
                    "-o", out]) == 0
    assert f"with {ONNX_FILE}: ONNX opset" in capsys.readouterr().out
    assert ONNX_FILE in listing(out)


def test_export_without_a_format_is_still_safetensors(peers, tmp_path):
    path = cs.export(peers, 0, tmp_path / "h0.safetensors")
    assert export_metadata(path)["format"] == "collabsurgery.backbone/1"


def test_tolerance_scales_with_the_logits():
    assert deploy.tolerance(torch.tensor([[-30.0, 2.0]])) == pytest.approx(30e-4 + 1e-5)
    assert deploy.tolerance(torch.zeros(2, 3)) == pytest.approx(1e-5)


def test_the_torchscript_exporter_of_older_torch_gives_the_same_file(peers, tmp_path,
                                                                     monkeypatch):
    """torch < 2.9 recommends the TorchScript exporter: the same contract holds through it."""
    monkeypatch.setattr(deploy, "onnx_exporter", lambda: "torchscript")
    path = cs.export(peers, 0, tmp_path / "ts.onnx", format="onnx")
    assert_equal_at_batches(path, lambda x: peers(x)[0], SIZE)


# ---------------------------------------------------------------------------- refusals

def test_outputs_beyond_tolerance_are_refused_and_nothing_is_written(peers, tmp_path,
                                                                      monkeypatch):
    real = deploy._onnx_runner

    def off_by_a_little(path):
        run = real(path)
        return lambda x: [y + 1e-3 for y in run(x)]
    monkeypatch.setattr(deploy, "_onnx_runner", off_by_a_little)
    with pytest.raises(deploy.OutputsDiffer, match="max abs diff .* > tolerance"):
        cs.export(peers, 0, tmp_path / "h.onnx", format="onnx")
    assert listing(tmp_path) == []


class _BranchOnData(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it; torch.fx treats it as a leaf
    (timm's notrace modules), so the graph around it wraps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.relu() if x.mean() > 0 else x


register_notrace_module(_BranchOnData)


class _Branchy(nn.Module):
    def __init__(self, num_classes: int = 10, **_: object):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _BranchOnData()
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.gate(self.stem(x))).mean((2, 3)))


@timm.models.register_model
def deploy_test_branchy(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """A timm-registered model whose forward branches on data (test-only name)."""
    return _Branchy(**kwargs)


@pytest.fixture(scope="module")
def graph_file(peers, tmp_path_factory):
    return save_graph(peers, tmp_path_factory.mktemp("graph") / "peers.safetensors")


@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_cli_refuses_a_model_the_exporter_cannot_handle(format, tmp_path, capsys):
    net = cs.wrap("deploy_test_branchy", split="gate", heads=2, num_classes=C,
                  input_size=(3, 8, 8))
    graph = save_graph(net, tmp_path / "branchy.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(["export", graph, "--head", "0", "--format", format,
                    "-o", out / "m.bin"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "deploy_test_branchy cannot be exported" in line
    assert "data-dependent" in line and "x.mean() > 0" in line  # the exporter's reason
    assert listing(out) == []


@pytest.mark.parametrize("argv, says", [
    (["--format", "tflite"], "invalid choice: 'tflite'"),
    (["--format", "onnx", "--opset", "x"], "expected an integer >= 7"),
    (["--format", "torch-export", "--opset", "17"], "--opset applies to --format onnx"),
    (["--features-only"], "--features-only applies to --format onnx and torch-export"),
    (["--format", "onnx", "--onnx"], "--onnx adds model.onnx to a model folder"),
])
def test_cli_refuses_bad_options_in_one_line(graph_file, argv, says, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(["export", graph_file, "--head", "0", *argv, "-o", out / "m.onnx"]) == 2
    line = one_line(capsys.readouterr().err)  # argparse's or ours, each one line
    assert "error: " in line and says in line
    if "invalid choice" in says:  # the valid formats listed
        assert all(f in line for f in ("safetensors", "timm-folder", "onnx", "torch-export"))
    assert listing(out) == []


@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_cli_refuses_an_output_folder_that_does_not_exist(graph_file, format, tmp_path,
                                                          capsys):
    out = tmp_path / "missing" / "m.onnx"
    assert run_cli(["export", graph_file, "--head", "0", "--format", format, "-o", out]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"folder {out.parent} does not exist" in line
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("extra", [[], ["--format", "timm-folder", "--onnx"]])
def test_onnx_without_onnxruntime_says_how_to_install_it(graph_file, extra, tmp_path,
                                                         capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    argv = extra or ["--format", "onnx"]
    out = tmp_path / ("folder" if extra else "m.onnx")
    assert run_cli(["export", graph_file, "--head", "0", *argv, "-o", out]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "onnxruntime not installed" in line and "pip install collabsurgery[onnx]" in line
    assert listing(tmp_path) == []


def test_python_api_refuses_an_unknown_format_listing_the_valid_ones(peers, tmp_path):
    with pytest.raises(UserError, match="unknown format 'tflite'; valid: safetensors, onnx, "
                                        "torch-export"):
        cs.export(peers, 0, tmp_path / "m", format="tflite")
    with pytest.raises(UserError, match="opset applies to format onnx only"):
        cs.export(peers, 0, tmp_path / "m", opset=17)
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------- preprocessing

def test_preprocessing_of_a_timm_preset_run_is_the_recipes():
    from collabsurgery.export.preprocessing import resolve

    recipe = {"data": {"preset": "timm", "image_size": 176, "test_image_size": 224,
                       "interpolation": "bicubic", "crop_pct": 0.95, "mean": [0.5, 0.4, 0.3],
                       "std": [0.2, 0.2, 0.2]}}
    pre = resolve(timm.create_model("resnet18"), "timm", recipe, (3, 176, 176))
    assert pre.input_size == (3, 224, 224)  # evaluated at test_image_size
    assert (pre.mean, pre.std, pre.interpolation, pre.crop_pct) == ((0.5, 0.4, 0.3),
                                                                    (0.2, 0.2, 0.2),
                                                                    "bicubic", 0.95)
    assert set(pre.source.values()) == {"recipe"}
    # no recipe: the graph's size, then timm's data config at the size the model was built for
    vit = timm.create_model("test_vit", img_size=32, patch_size=8)
    assert resolve(vit, "timm").input_size == (3, 32, 32)
    assert resolve(vit, "timm", None, (3, 32, 32)).source["input_size"] == "graph"


def test_a_ready_module_head_needs_its_module(tmp_path):
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).relu().mean((2, 3)))

    net = cs.wrap(Small(), pattern="instances", heads=2, input_size=(3, 8, 8)).eval()
    with pytest.raises(UserError, match="ready module .*export_artifact"):
        cs.export(net, 1, tmp_path / "small.onnx", format="onnx")
    assert listing(tmp_path) == []
    export = cs.export(net, 1, tmp_path / "small.safetensors")
    path = export_artifact(export, tmp_path / "small.onnx", "onnx", input_size=(3, 8, 8),
                           model=Small()).path
    assert_equal_at_batches(path, lambda x: net(x)[1], 8)
