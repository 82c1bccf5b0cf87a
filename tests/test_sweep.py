"""The model sweep (collabsurgery.measure.sweep, tools/sweep_models.py) on a handful of small models."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import collabsurgery.measure.sweep as sweep
from collabsurgery.measure.sweep import (CSV_COLUMNS, STAGES, SweepResult, check_model,
                                         check_onnx_only, default_models, family_of,
                                         normalise_reason, summarise)

ROOT = Path(__file__).resolve().parents[1]
TIMM_STAGES = list(STAGES)
TORCHVISION_STAGES = [s for s in STAGES if s != "overlay"]


@pytest.mark.parametrize("name, family", [
    ("resnet18", "resnet"),                          # a CNN at its own 224
    ("vit_tiny_patch16_224", "vision_transformer"),  # a ViT
    ("levit_128s", "levit"),                         # a conv/attention hybrid
    ("torchvision.squeezenet1_0", "squeezenet"),     # torchvision
])
def test_small_models_pass_every_check(name: str, family: str) -> None:
    result = check_model(name, threads=1)
    assert result.status == "pass", f"{result.stage}: {result.reason}"
    assert result.family == family and result.split and result.params_m > 0
    expected = TORCHVISION_STAGES if name.startswith("torchvision.") else TIMM_STAGES
    assert result.checks == expected and result.stage == expected[-1]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.no_grad == [] and result.reason == ""
    if result.library == "timm":
        assert result.overlay_max_abs_diff is not None and result.overlay_max_abs_diff <= 1e-4


def test_model_without_a_clean_cut_is_refused() -> None:
    result = check_model("crossvit_tiny_240", threads=1)
    assert (result.status, result.stage, result.split) == ("refused", "wrap", "")
    assert "no single tensor carries the whole state" in result.reason
    assert "pattern='instances'" in result.reason
    assert result.checks == ["create", "splits"]


class _BranchesOnData(torch.nn.Module):
    """A classifier with data-dependent control flow, as Gemma 4's ViT has: FX cannot trace it."""

    def __init__(self, num_classes: int = 1000, **_: object):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


@timm.models.register_model
def sweep_test_untraceable(pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
    """Registered under a test-only name so that the sweep can build it by name."""
    return _BranchesOnData(**kwargs)


def test_an_untraceable_model_is_refused() -> None:
    result = check_model("sweep_test_untraceable", threads=1)
    assert (result.status, result.stage) == ("refused", "splits")
    assert "cannot be traced by torch.fx" in result.reason
    assert "pattern='instances'" in result.reason


def test_unknown_model_is_refused_at_create() -> None:
    result = check_model("no_such_model_xyz")
    assert (result.status, result.stage) == ("refused", "create")
    assert "unknown model" in result.reason


def test_wrong_logits_are_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = sweep.load_backbone

    def load_and_perturb(path, *args, **kwargs):
        model = real_load(path, *args, **kwargs)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "bias" in n).add_(1.0)
        return model

    monkeypatch.setattr(sweep, "load_backbone", load_and_perturb)
    result = check_model("cifar_resnet20", threads=1)
    assert (result.status, result.stage) == ("fail", "logits")
    assert "loaded backbone logits differ" in result.reason
    assert result.checks == TIMM_STAGES[:TIMM_STAGES.index("logits")]


def test_missing_gradients_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real_wrap = sweep.wrap

    def wrap_with_unused_parameter(*args, **kwargs):
        net = real_wrap(*args, **kwargs)
        net.register_parameter("unused_weight", torch.nn.Parameter(torch.zeros(3)))
        return net

    monkeypatch.setattr(sweep, "wrap", wrap_with_unused_parameter)
    result = check_model("cifar_resnet20", threads=1)
    assert (result.status, result.stage) == ("fail", "gradients")
    assert result.no_grad == ["unused_weight"] and "unused_weight" in result.reason


def test_family_of_names_the_timm_module_of_a_model() -> None:
    assert family_of("resnet50") == "resnet"
    assert family_of("vit_tiny_patch16_224") == "vision_transformer"
    assert family_of("torchvision.mobilenet_v2") == "mobilenetv2"


def test_default_models_keep_the_smallest_of_each_timm_family() -> None:
    sizes = {"resnet50": 25.6, "resnet18": 11.7, "vit_small_patch16_224": 22.1,
             "vit_tiny_patch16_224": 5.7, "torchvision.resnet50": 25.6,
             "torchvision.resnet18": 11.7}
    chosen = default_models(sizes, params=sizes.__getitem__)
    assert chosen == [("resnet18", 11.7), ("vit_tiny_patch16_224", 5.7),
                      ("torchvision.resnet50", 25.6), ("torchvision.resnet18", 11.7)]
    capped = default_models(sizes, max_params_m=12, every=True, params=sizes.__getitem__)
    assert [n for n, _ in capped] == ["resnet18", "vit_tiny_patch16_224", "torchvision.resnet18"]
    assert default_models(["resnet50"], every=True) == [("resnet50", None)]  # nothing counted


def test_summarise_groups_causes_and_messages() -> None:
    results = [
        SweepResult("resnet18", "resnet", "timm", 11.7, "pass", "overlay", bit_equal=True),
        SweepResult("vit_a", "vision_transformer", "timm", 5.0, "fail", "logits",
                    "loaded backbone logits differ from head 1's: max abs diff 0.031"),
        SweepResult("vit_b", "vision_transformer", "timm", 9.0, "fail", "logits",
                    "loaded backbone logits differ from head 1's: max abs diff 2.5e-03"),
        SweepResult("foo_net", "foo", "timm", 1.0, "fail", "export",
                    "RuntimeError: shape [2, 3] of 'foo_net.blocks.1' is wrong"),
        SweepResult("crossvit_a", "crossvit", "timm", 7.0, "refused", "wrap",
                    "invalid split point 'blocks.0' (not a clean single-tensor cut)"),
        SweepResult("crossvit_b", "crossvit", "timm", 8.0, "refused", "wrap",
                    "invalid split point 'blocks.2' (not a clean single-tensor cut)"),
        SweepResult("torchvision.alexnet", "alexnet", "torchvision", 61.1, "pass", "logits"),
        SweepResult("torchvision.vgg11", "vgg", "torchvision", 132.9, "timeout", "wrap",
                    "no result after 300 s"),
    ]
    text = summarise(results, command="python tools/sweep_models.py --all")
    assert "`python tools/sweep_models.py --all`" in text
    assert "- timm: 1/4 families pass (25.0%); 1 refused, 2 fail, 0 timeout" in text
    assert "- timm models: 1/6 models pass (16.7%)" in text
    assert "- torchvision: 1/2 models pass (50.0%); 0 refused, 0 fail, 1 timeout" in text
    failures = text.split("## Failures by cause")[1].split("##")[0]
    assert "| 2 | logits: loaded backbone logits differ from head N's: max abs diff N |" \
        in failures and "| 1 | export: RuntimeError" in failures
    refusals = text.split("## Refusals by message")[1].split("##")[0]
    assert "| 2 | invalid split point '…' (…) |" in refusals
    assert "torchvision.vgg11" in text.split("## Timeouts")[1]


def test_normalise_reason_strips_model_specific_detail() -> None:
    assert normalise_reason("model 'resnet18' wants 224x224, got [2, 3, 32, 32] (batch 2)",
                            "resnet18") == "model '…' wants NxN, got […] (…)"
    assert normalise_reason("resnet18 failed at layer3.1", "resnet18") == \
        "<model> failed at <name>.N"
    assert normalise_reason("Inception3 returns a InceptionOutputs, not logits") == \
        normalise_reason("GoogLeNet returns a GoogLeNetOutputs, not logits") == \
        "<name> returns a <name>, not logits"
    assert normalise_reason("RuntimeError: mat1 and mat2 shapes cannot be multiplied") == \
        "RuntimeError: <name> and <name> shapes cannot be multiplied"


@pytest.mark.slow  # the sweep tool in subprocesses: the full tier
def test_sweep_tool_writes_csv_and_summary(tmp_path: Path) -> None:
    csv_path, summary = tmp_path / "sweep.csv", tmp_path / "sweep.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sweep_models.py"), "--all", "--no-torchvision",
         "--filter", "cifar_resnet20", "--filter", "no_such_model_xyz,mobilenetv3_small_050",
         "--csv", str(csv_path), "--summary", str(summary), "--jobs", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "[2/2]" in done.stdout and "pass" in done.stdout
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert {r["model"]: (r["status"], r["stage"]) for r in rows} == {
        "mobilenetv3_small_050": ("pass", "overlay"), "cifar_resnet20": ("pass", "overlay")}
    text = summary.read_text()
    assert "- timm: 2/2 families pass (100.0%)" in text
    assert "--filter cifar_resnet20" in text


@pytest.mark.slow  # the sweep tool in subprocesses: the full tier
def test_sweep_tool_times_out(tmp_path: Path) -> None:
    csv_path = tmp_path / "sweep.csv"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sweep_models.py"), "--no-torchvision",
         "--filter", "cifar_resnet20", "--timeout", "0.5", "--csv", str(csv_path),
         "--summary", str(tmp_path / "sweep.md")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    with csv_path.open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["model"], row["status"]) == ("cifar_resnet20", "timeout")
    assert row["reason"] == "no result after 0.5 s"


def test_onnx_stage_follows_a_pass() -> None:
    results = []
    result = check_model("cifar_resnet20", threads=1, onnx=True, on_result=results.append)
    assert result.status == "pass" and result.onnx == "pass", result.onnx_reason
    assert result.checks == TIMM_STAGES  # the ONNX stage is not one of the model's stages
    assert result.onnx_max_abs_diff <= result.onnx_tolerance and result.onnx_seconds > 0
    assert [r.onnx for r in results] == ["pass"]  # reported before it ran: same object


def test_onnx_only_refuses_what_the_exporter_cannot_handle_with_its_reason() -> None:
    result = check_onnx_only("sweep_test_untraceable", threads=1)
    assert (result.status, result.stage, result.onnx) == ("refused", "onnx", "refused")
    assert "cannot be exported to ONNX" in result.onnx_reason
    assert "data-dependent" in result.onnx_reason and "\n" not in result.onnx_reason
    ok = check_onnx_only("cifar_resnet20", threads=1)
    assert (ok.status, ok.onnx, ok.checks) == ("pass", "pass", ["create", "onnx"])


def test_summarise_has_the_onnx_section() -> None:
    results = [
        SweepResult("resnet18", "resnet", "timm", 11.7, "pass", "overlay", onnx="pass",
                    onnx_max_abs_diff=1e-7, onnx_tolerance=1e-4, onnx_seconds=3.0),
        SweepResult("odd_net", "odd", "timm", 1.0, "pass", "overlay", onnx="refused",
                    onnx_reason="odd_net cannot be exported to ONNX by torch.onnx.export "
                                "(dynamo exporter): GuardOnDataDependentSymNode: Could not "
                                "guard on data-dependent expression Eq(u0, 1)"),
        SweepResult("torchvision.alexnet", "alexnet", "torchvision", 61.1, "pass", "logits",
                    onnx="pass", onnx_max_abs_diff=0.0, onnx_tolerance=1e-5),
    ]
    text = summarise(results)
    onnx = text.split("## ONNX\n")[1]
    assert "- timm: 1/2 families pass (50.0%); 1 refused, 0 fail, 0 timeout" in onnx
    assert "- torchvision: 1/1 models pass (100.0%)" in onnx
    assert "- weak: 1/2 passes" in onnx
    assert "| 1 | <model> cannot be exported to ONNX" in onnx and "| odd_net | odd |" in onnx
    assert "## ONNX" not in summarise([SweepResult("a", status="pass")])  # the stage not run
    assert summarise(results, onnx_only=True).startswith("# collabsurgery model sweep: ONNX")


def test_a_timeout_in_the_onnx_stage_keeps_what_passed() -> None:
    """The child reports its result before the ONNX stage; a timeout there marks only it."""
    import tempfile
    import types

    from helpers import load_tool

    tool = load_tool("sweep_models")
    passed = SweepResult("resnet18", "resnet", "timm", 11.7, "pass", "overlay", split="layer2")
    log = tempfile.TemporaryFile()
    log.write(f"{sweep.RESULT_PREFIX}{passed.to_json()}\n{sweep.STAGE_PREFIX}onnx\n".encode())
    child = tool.Child(0, "resnet18", 11.7, types.SimpleNamespace(returncode=-9), log)
    result = tool.collect(child, timed_out=True, timeout=300)
    assert (result.status, result.stage, result.split) == ("pass", "overlay", "layer2")
    assert (result.onnx, result.onnx_reason) == ("timeout", "no result after 300 s")
    assert tool.child_flags(types.SimpleNamespace(onnx=True, onnx_only=False)) == ("--onnx",)
