"""The command line: splits | wrap | export. A user mistake is exit status 2 with exactly one
line on stderr and no traceback."""
from __future__ import annotations

import os
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import collabsurgery as cs
from collabsurgery.graphs.saving import load_graph

from helpers import make_input, one_line_error, run_cli as run  # main(argv)'s exit status

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--input-size", "32", "--num-classes", "10"]


def test_splits_prints_one_point_per_line(capsys):
    assert run(["splits", "resnet18", *SMALL]) == 0
    out = capsys.readouterr()
    lines = out.out.split()
    assert lines == cs.splits("resnet18", input_size=(3, 32, 32), num_classes=10)
    assert {"layer1", "layer2", "layer3", "layer4"} <= set(lines)
    assert "layer1.0.conv1" not in lines
    assert out.err == ""


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "graph.safetensors"
    assert run(["wrap", "cifar_resnet20", "--split", "layer1,layer2", "--heads", "4",
                "--rescale", "loss", *SMALL, "--save", path]) == 0
    return path


def test_wrap_prints_the_summary_and_saves(graph_file, capsys):
    assert run(["wrap", "resnet18", "--split", "layer2,layer3", "--heads", "4", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "4 heads" in out and "fan-outs (1, 2, 2)" in out and "input 3x32x32" in out
    assert "input..layer2" in out and "layer3..output" in out
    for label in ("parameters", "forward GFLOPs/image", "activations MB/image"):
        assert label in out
    net = load_graph(graph_file)
    assert net.num_heads == 4 and net.fanouts == (1, 2, 2) and net.rescale == "loss"
    assert os.listdir(graph_file.parent) == [graph_file.name]


def test_export_a_head_of_a_saved_graph(graph_file, tmp_path, capsys):
    out = tmp_path / "head1.safetensors"
    assert run(["export", graph_file, "--head", "1", "-o", out]) == 0
    assert f"exported head 1 to {out}" in capsys.readouterr().out
    net = load_graph(graph_file).eval()
    model = cs.load_backbone(out)
    x = make_input()
    with torch.no_grad():
        assert torch.equal(model(x), net(x)[1])
    assert os.listdir(tmp_path) == ["head1.safetensors"]


@pytest.mark.parametrize("head,match", [
    ("best", r"head 'best' needs a training run.*0\.\.3"),
    ("4", r"head '4' out of range; valid: best or 0\.\.3"),
    ("-1", r"out of range"),
    ("one", r"out of range"),
])
def test_export_bad_head_of_a_graph_file(graph_file, head, match, tmp_path, capsys):
    assert run(["export", graph_file, "--head", head, "-o", tmp_path / "o.safetensors"]) == 2
    err = capsys.readouterr()
    assert re.search(match, one_line_error(err.err))
    assert err.out == ""
    assert os.listdir(tmp_path) == []


def _bad_source(kind, tmp_path, graph_file):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "missing":
        pass
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "foreign":
        save_file({"w": torch.zeros(2)}, str(path))
    elif kind == "truncated":
        data = graph_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "backbone":
        net = load_graph(graph_file)
        cs.export(net, 0, path)
    elif kind == "directory":
        path = tmp_path / "not_a_run"
        path.mkdir()
    return path


@pytest.mark.parametrize("kind,match", [
    ("missing", r"no such file or run directory"),
    ("text", r"not a readable safetensors file"),
    ("foreign", r"no format=collabsurgery.graph/1 metadata"),
    ("truncated", r"not a readable safetensors file|truncated or corrupt"),
    ("backbone", r"no format=collabsurgery.graph/1 metadata"),
    ("directory", r"not a training run"),
])
def test_export_bad_source(kind, match, graph_file, tmp_path, capsys):
    source = _bad_source(kind, tmp_path, graph_file)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert run(["export", source, "--head", "0", "-o", out_dir / "x.safetensors"]) == 2
    assert re.search(match, one_line_error(capsys.readouterr().err))
    assert os.listdir(out_dir) == []


def test_export_a_timm_model_folder(graph_file, tmp_path, capsys):
    folder = tmp_path / "folder"
    assert run(["export", graph_file, "--head", "2", "--format", "timm-folder", "-o", folder]) == 0
    assert f'local-dir:{folder}' in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    net = load_graph(graph_file).eval()
    x = make_input()
    with torch.no_grad():
        assert torch.equal(model(x), net(x)[2])


def test_export_refuses_an_unknown_format_or_a_full_folder(graph_file, tmp_path, capsys):
    assert run(["export", graph_file, "--head", "0", "--format", "tflite",
                "-o", tmp_path / "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --format: invalid choice: 'tflite'" in err[0]
    assert all(f in err[0] for f in ("safetensors", "timm-folder", "onnx", "torch-export"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert run(["export", graph_file, "--head", "0", "--format", "timm-folder",
                "-o", tmp_path / "taken"]) == 2
    assert "exists and is not empty" in one_line_error(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]


def test_export_to_a_directory(graph_file, tmp_path, capsys):
    assert run(["export", graph_file, "--head", "0", "-o", tmp_path]) == 2
    assert "is a directory" in one_line_error(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,match", [
    (["splits", "resnet1800"], r"unknown model 'resnet1800' \(did you mean resnet18"),
    (["splits", "torchvision.resnet1800"], r"unknown torchvision model"),
    (["wrap", "resnet18", "--split", "layer1.0.conv1"],
     r"invalid split point 'layer1\.0\.conv1' \(not a clean single-tensor cut\); "
     r"valid split points: conv1, .*layer1, .*layer4"),
    (["wrap", "densenet121", "--split", "features.denseblock1.denselayer1"],
     r"invalid split point 'features\.denseblock1\.denselayer1'.*features\.transition1"),
    (["wrap", "resnet18", "--split", "layer7"], r"no such module or node.*valid split points"),
    (["wrap", "resnet18", "--split", "layer2", "--heads", "0"], r"heads must be an integer >= 1"),
    (["wrap", "resnet18", "--split", "layer1,layer3", "--heads", "4", "--branches", "2,3"],
     r"multiply to heads=4"),
    (["wrap", "resnet18", "--split", "layer3,layer1", "--heads", "4"], r"execution order"),
    (["wrap", "resnet18", "--split", "layer2", "--pattern", "instances"],
     r"'instances' takes no split points"),
    (["wrap", "resnet18", "--heads", "2"], r"needs split points; valid split points"),
    (["wrap", "resnet18", "--split", "layer2", "--heads", "two"], r"invalid int value"),
    (["wrap", "resnet18", "--split", "layer2", "--pattern", "ring"], r"invalid choice"),
    (["wrap", "resnet18", "--split", "layer2", "--branches", "2,x"], r"comma-separated integers"),
    (["wrap", "resnet18", "--input-size", "big"], r"integer image size"),
    (["export", "graph.safetensors"], r"required: -o/--output"),
    (["frobnicate"], r"invalid choice"),
])
def test_user_errors_are_one_line_exit_2(argv, match, capsys):
    """Library UserErrors and argparse usage errors alike."""
    if argv[0] != "export" and argv[0] != "frobnicate" and "--input-size" not in argv:
        argv = [*argv, *SMALL]
    assert run(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith("collabsurgery") and "error: " in lines[0]
    assert re.search(match, lines[0]), lines[0]


def _flop_ratio(output: str) -> float:
    (line,) = [l for l in output.splitlines() if l.startswith("forward GFLOPs/image")]
    return float(line.split()[-1])


@pytest.mark.parametrize("threads,execution", [(1, None), *(  # resnet50: more in the full tier
    pytest.param(t, e, marks=pytest.mark.slow)
    for t, e in [(2, None), (2, "loop"), (2, "fused"), (2, "packed")])])
def test_wrap_costs_do_not_depend_on_threads_or_execution(threads, execution, capsys):
    """The printed FLOP ratio is the method's (1.95 for the paper's setting), not the work of
    building and checking an execution plan on the first forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        argv = ["wrap", "resnet50", "--split", "layer2,layer3", "--heads", "4"]
        assert run(argv + (["--execution", execution] if execution else [])) == 0
    finally:
        torch.set_num_threads(before)
    assert _flop_ratio(capsys.readouterr().out) == pytest.approx(1.95, abs=0.005)


def test_graph_options_are_generated_from_the_builders_declarations(monkeypatch, capsys):
    """A new builder argument is a `wrap` option, with its description and default, and goes
    to the builder; no edit of cli.py."""
    from typing import Annotated

    from pydantic import Field

    from collabsurgery.cli import _graph_arguments, build_parser
    from collabsurgery.graphs import GRAPH_KINDS

    def build_toy(model, width=1, input_size=None, model_kwargs=None):
        raise AssertionError("not built here")

    # set as objects: this module's string annotations would not resolve the local imports
    build_toy.__annotations__ = {"width": Annotated[int, Field(ge=1, description="toy width")]}
    monkeypatch.setitem(GRAPH_KINDS, "toy", build_toy)
    args = build_parser().parse_args(["wrap", "m", "--pattern", "toy", "--width", "3"])
    assert args.pattern == "toy" and _graph_arguments(args) == {"width": 3}
    assert run(["wrap", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--width WIDTH toy: toy width (default 1)" in help_text
    assert ("--heads HEADS tree: number of heads (default: the product of branches, else 2 per "
            "split point") in help_text and "instances: number of heads (default 2)" in help_text


@pytest.mark.parametrize("flags, given", [
    (["--seed", "5"], {"seed": 5}),
    (["--route-seed", "5"], {"seed": 5}),        # the spellings from before, kept
    (["--p", "0.2"], {"p": 0.2}),
    (["--dropout-p", "0.2"], {"p": 0.2}),
    (["--local", "layer1,layer2"], {"local": "layer1,layer2"}),
    (["--branches", "2,2", "--paths", "0,1;1,0"], {"branches": [2, 2], "paths": [[0, 1], [1, 0]]}),
    (["--checkpoint-branches", "selective"], {"checkpoint_branches": "selective"}),
])
def test_graph_options_read_their_declared_types(flags, given):
    from collabsurgery.cli import _graph_arguments, build_parser

    assert _graph_arguments(build_parser().parse_args(["wrap", "m", *flags])) == given
