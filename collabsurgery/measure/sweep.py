"""The model-zoo sweep: does wrap -> train step -> export -> load hold for every model?

One model is checked by :func:`check_model`, in stages (the first that goes wrong is recorded):

==================  ===================================================================
``create``          build the model (random weights), count parameters, default input size
``splits``          ``cs.splits(name, input_size=size)``
``wrap``            ``cs.wrap`` with 2 heads at the middle split point, 10 classes
``forward-backward`` batch of 2 in train mode, loss = sum of the ``[H, B, C]`` logits
``gradients``       every trainable parameter got a finite gradient
``export``          ``cs.export(net, head=1)``
``load``            ``cs.load_backbone`` (strict)
``logits``          eval logits of head 1 equal the loaded model's (allclose 1e-4)
``overlay``         timm only: ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``
==================  ===================================================================

With ``onnx=True`` an ONNX stage follows a pass: the loaded head 1 exported to ONNX and run by
onnxruntime (:func:`collabsurgery.export.deploy.save_onnx`: dynamic batch, outputs equal to the
head's eval logits within 1e-4 x max|logit| + 1e-5 at batch 1 and 3). Its outcome is the
separate ``onnx`` field (``pass``; ``refused``: the exporter or onnxruntime cannot handle the
model, with the exporter's reason; ``fail``: the outputs differ or something else broke;
``timeout``), so a model's ``status`` stays that of the stages above. :func:`check_onnx_only`
is the reduced ONNX check: the model at its default input size with random weights (what a head
of it exports to), exported and run, without wrapping or training.

Status ``refused`` is a :class:`~collabsurgery.errors.UserError` while creating, listing split
points or wrapping (the library's intended refusal); any other exception, a UserError after the
graph was built, or a check that does not hold is ``fail``. ``timeout`` is set by the caller that
runs the check in a subprocess (``tools/sweep_models.py``); ``python -m collabsurgery.measure.sweep NAME``
runs one check and prints its result as one JSON line.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import importlib.metadata
import json
import math
import re
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchvision

from collabsurgery.errors import UserError, first_line
from collabsurgery.export import export, load_backbone
from collabsurgery.export.deploy import NotExportable, OutputsDiffer, save_onnx
from collabsurgery.graphs import splits, wrap
from collabsurgery.measure.bench import torch_threads
from collabsurgery.models import backbones

STAGES = ("create", "splits", "wrap", "forward-backward", "gradients", "export", "load",
          "logits", "overlay")
REFUSING_STAGES = ("create", "splits", "wrap")  # a UserError after these is a failure
STATUSES = ("pass", "refused", "fail", "timeout")
CSV_COLUMNS = ("model", "family", "library", "params_m", "status", "stage", "reason", "seconds",
               "split", "max_abs_diff", "bit_equal", "logit_scale", "onnx", "onnx_max_abs_diff",
               "onnx_tolerance", "onnx_seconds", "onnx_reason")
RESULT_PREFIX = "SWEEP-RESULT "  # the line of a child's stdout that carries its result
STAGE_PREFIX = "SWEEP-STAGE "  # progress lines, so a timeout still says where it hung
NUM_CLASSES = 10
HEADS = 2
BATCH = 2
ATOL = RTOL = 1e-4
WEAK_SCALE = 1e-2  # eval logits this small make atol=1e-4 a loose check
# input sizes of torchvision models that do not run at 3x224x224
TORCHVISION_INPUT_SIZES = {"inception_v3": (3, 299, 299)}


@dataclass
class SweepResult:
    """The outcome of one model's check; ``stage`` is where it stopped (the last one on a pass)."""

    model: str
    family: str = ""
    library: str = ""
    params_m: float | None = None
    status: str = "fail"
    stage: str = "create"
    reason: str = ""
    seconds: float = 0.0
    split: str = ""
    max_abs_diff: float | None = None
    bit_equal: bool | None = None
    logit_scale: float | None = None  # max |logit| of head 1 in eval: what max_abs_diff is against
    overlay_max_abs_diff: float | None = None
    no_grad: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # stages completed, in order
    onnx: str = ""  # the ONNX stage: pass, refused, fail, timeout; "" when not run
    onnx_reason: str = ""
    onnx_max_abs_diff: float | None = None  # onnxruntime vs the head, at batch 1 and 3
    onnx_tolerance: float | None = None
    onnx_seconds: float | None = None

    def to_json(self) -> str:
        """One line of JSON (non-finite numbers as null)."""
        data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> SweepResult:
        """The inverse of :meth:`to_json` (unknown keys are ignored)."""
        data = json.loads(line)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def csv_row(self) -> dict[str, str]:
        """The :data:`CSV_COLUMNS` of this result, as strings."""
        row = {name: getattr(self, name) for name in CSV_COLUMNS}
        return {k: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
                for k, v in row.items()}


class CheckFailed(Exception):
    """A check of the sweep did not hold (not an exception of the library)."""


# ---------------------------------------------------------------------------------- model lists

def library_of(name: str) -> str:
    """``torchvision`` for ``torchvision.<name>``, else ``timm``."""
    return "torchvision" if name.startswith(backbones.TORCHVISION_PREFIX) else "timm"


def family_of(name: str) -> str:
    """The architecture family: the module that defines the model (``vision_transformer``)."""
    if library_of(name) == "torchvision":
        short = name[len(backbones.TORCHVISION_PREFIX):]
        module = torchvision.models.get_model_builder(short).__module__
    else:
        module = timm.models.model_entrypoint(name).__module__
    return module.rsplit(".", 1)[-1]


def _create(name: str, num_classes: int | None = None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return backbones.create(backbones.parse_model_name(name, kwargs))


def count_params_m(name: str) -> float:
    """Parameters of the model in millions (default classes), built on the meta device when it
    can be (no memory, no initialisation), else normally."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructors' FutureWarnings, once per model
        try:
            with torch.device("meta"):
                model = _create(name)
        except Exception:  # noqa: BLE001 - some constructors compute on tensors; build for real
            model = _create(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _matches(name: str, patterns: Sequence[str]) -> bool:
    short = name.rsplit(".", 1)[-1] if library_of(name) == "torchvision" else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p) for p in patterns)


def candidate_models(patterns: Sequence[str] = (), timm_models: bool = True,
                     torchvision_models: bool = True) -> list[str]:
    """timm names and ``torchvision.<name>`` classification models, filtered by fnmatch
    ``patterns`` (either the qualified or the bare torchvision name may match).

    timm's ``test_*`` models (tiny stand-ins used by timm's own tests, which would otherwise be
    the smallest of their families) are left out unless a pattern starts with ``test_``.
    """
    importlib.import_module("collabsurgery.models")  # registers our CIFAR models with timm
    names = list(timm.list_models()) if timm_models else []
    if not any(p.startswith("test_") for p in patterns):
        names = [n for n in names if not n.startswith("test_")]
    if torchvision_models:
        names += [backbones.TORCHVISION_PREFIX + n
                  for n in sorted(torchvision.models.list_models(module=torchvision.models))]
    return [n for n in names if not patterns or _matches(n, patterns)]


def default_models(names: Iterable[str], max_params_m: float | None = None, every: bool = False,
                   params: Callable[[str], float] = count_params_m,
                   ) -> list[tuple[str, float | None]]:
    """``(name, params_m)`` to sweep: models up to ``max_params_m`` million parameters; for timm
    only the smallest of each family unless ``every`` (torchvision models are all kept).

    Parameters are only counted when needed (``params_m`` is None otherwise); a model whose
    count fails is kept, with None, and the check will report why it cannot be built.
    """
    names = list(names)
    need = max_params_m is not None or (not every and any(library_of(n) == "timm" for n in names))
    counted: dict[str, float | None] = {}
    for name in names:
        counted[name] = _safe_count(name, params) if need else None
    kept = [n for n in names if max_params_m is None or counted[n] is None
            or counted[n] <= max_params_m]
    if not every:
        kept = _smallest_per_family(kept, counted)
    return [(n, counted[n]) for n in kept]


def _safe_count(name: str, params: Callable[[str], float]) -> float | None:
    try:
        return params(name)
    except Exception:  # noqa: BLE001 - reported by the check itself
        return None


def _smallest_per_family(names: list[str], counted: dict[str, float | None]) -> list[str]:
    def size(name: str) -> float:
        return math.inf if counted[name] is None else counted[name]

    best: dict[str, str] = {}
    for name in (n for n in names if library_of(n) == "timm"):
        family = family_of(name)
        if family not in best or size(name) < size(best[family]):
            best[family] = name
    keep = set(best.values())
    return [n for n in names if library_of(n) != "timm" or n in keep]


def input_size_of(name: str, module: nn.Module) -> tuple[int, int, int]:
    """The model's own default input size (:func:`~collabsurgery.models.backbones.default_input_size`;
    torchvision inception_v3 at the 299 px it was designed for)."""
    short = name.split(".", 1)[1] if library_of(name) == "torchvision" else ""
    return TORCHVISION_INPUT_SIZES.get(short) or tuple(backbones.default_input_size(module))


# ---------------------------------------------------------------------------------- the check

def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = str(err).strip()
    line = f"{type(err).__name__}: {first_line(err) if text else ''}".strip()
    return line if len(line) <= 300 else line[:297] + "..."


def check_model(name: str, threads: int | None = None,
                on_stage: Callable[[str], None] | None = None,
                workdir: str | Path | None = None, onnx: bool = False,
                on_result: Callable[[SweepResult], None] | None = None) -> SweepResult:
    """Run every stage of the sweep on one model; never raises for a model's failure.

    ``threads`` sets torch's intra-op threads for the check; ``on_stage(stage)`` is called as
    each stage starts; the export goes to ``workdir`` (default: a temporary directory).
    ``onnx``: after a pass, the ONNX stage (``on_result`` gets the result before it starts, so
    that a timeout in it keeps what passed).
    """
    result = SweepResult(model=name, library=library_of(name))
    start = time.perf_counter()

    def enter(stage: str) -> None:
        if result.stage != stage:  # stages only advance: the previous one is done
            result.checks.append(result.stage)
        result.stage = stage
        if on_stage:
            on_stage(stage)

    with torch_threads(threads), tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            torch.manual_seed(0)
            model, size = _run_stages(name, result, enter, Path(tmp) / "h1.safetensors")
            result.checks.append(result.stage)
            result.status = "pass"
            result.seconds = round(time.perf_counter() - start, 2)
            if onnx:
                if on_result:
                    on_result(result)
                if on_stage:
                    on_stage("onnx")
                onnx_stage(name, model, size, Path(tmp) / "h1.onnx", result)
        except UserError as err:
            refused = result.stage in REFUSING_STAGES
            result.status = "refused" if refused else "fail"
            result.reason = first_line(err) if refused else one_line(err)
        except CheckFailed as err:
            result.reason = str(err)
        except Exception as err:  # noqa: BLE001 - a sweep reports every failure and goes on
            result.reason = one_line(err)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _run_stages(name: str, result: SweepResult, enter: Callable[[str], None],
                path: Path) -> tuple[nn.Module, tuple[int, ...]]:
    """Every stage up to the last; returns the loaded head 1 (eval) and the input size."""
    enter("create")
    module = _create(name)
    result.family = family_of(name)
    result.params_m = round(sum(p.numel() for p in module.parameters()) / 1e6, 3)
    size = input_size_of(name, module)
    del module
    enter("splits")
    points = splits(name, input_size=size)
    enter("wrap")
    result.split = points[len(points) // 2] if points else ""
    # the loop: the checks compare bit for bit with the plain model, which no packed or fused
    # plan (a different summation order) promises
    net = wrap(name, split=result.split or None, heads=HEADS, num_classes=NUM_CLASSES,
                  input_size=size, execution="loop")
    x = torch.randn(BATCH, *size)
    _train_step(net, x, result, enter)
    return _export_and_compare(name, net, x, path, result, enter), size


def _train_step(net: nn.Module, x: torch.Tensor, result: SweepResult,
                enter: Callable[[str], None]) -> None:
    enter("forward-backward")
    net.train()
    logits = net(x)
    expected = (HEADS, BATCH, NUM_CLASSES)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CheckFailed(f"train logits are {shape}, expected {expected}")
    if not torch.isfinite(logits).all():
        raise CheckFailed("train logits are not finite")
    logits.sum().backward()
    enter("gradients")
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    result.no_grad = [n for n, p in trainable
                      if p.grad is None or not torch.isfinite(p.grad).all()]
    if result.no_grad:
        raise CheckFailed(f"{len(result.no_grad)} of {len(trainable)} trainable parameters "
                          f"have no finite gradient ({_some(result.no_grad)})")


def _some(names: list[str], n: int = 4) -> str:
    more = f", +{len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _export_and_compare(name: str, net: nn.Module, x: torch.Tensor, path: Path,
                        result: SweepResult, enter: Callable[[str], None]) -> nn.Module:
    enter("export")
    export(net, head=1, path=path)
    enter("load")
    model = load_backbone(path)
    enter("logits")
    net.eval()
    with torch.no_grad():
        expected = net(x)[1]
        result.logit_scale = expected.abs().max().item()
        result.max_abs_diff, result.bit_equal = _compare(expected, model(x), "loaded backbone")
    if result.library != "timm":
        return model
    enter("overlay")
    overlay = timm.create_model(name, pretrained=True, num_classes=NUM_CLASSES,
                                pretrained_cfg_overlay=dict(file=str(path),
                                                            num_classes=NUM_CLASSES)).eval()
    with torch.no_grad():
        result.overlay_max_abs_diff, _ = _compare(expected, overlay(x), "timm overlay load")
    return model


def onnx_stage(name: str, model: nn.Module, size: Sequence[int], path: Path,
               result: SweepResult) -> None:
    """Export ``model`` to ONNX at ``path`` and verify it in onnxruntime; fills the result's
    ``onnx*`` fields (never raises for the model's failure)."""
    start = time.perf_counter()
    try:
        verified = save_onnx(model, path, size, what=name)
        result.onnx = "pass"
        result.onnx_max_abs_diff, result.onnx_tolerance = verified.max_abs_diff, \
            verified.tolerance
    except NotExportable as err:
        result.onnx, result.onnx_reason = "refused", first_line(err)
    except OutputsDiffer as err:
        result.onnx, result.onnx_reason = "fail", first_line(err)
    except Exception as err:  # noqa: BLE001 - a sweep reports every failure and goes on
        result.onnx, result.onnx_reason = "fail", one_line(err)
    result.onnx_seconds = round(time.perf_counter() - start, 2)


def check_onnx_only(name: str, threads: int | None = None,
                    on_stage: Callable[[str], None] | None = None,
                    workdir: str | Path | None = None) -> SweepResult:
    """The reduced ONNX check: the model (random weights, 10 classes, eval) at its default
    input size exported to ONNX and verified in onnxruntime, nothing wrapped or trained.
    ``status`` and ``stage`` are the ONNX stage's (``create`` when the model cannot be built)."""
    result = SweepResult(model=name, library=library_of(name))
    start = time.perf_counter()
    with torch_threads(threads), tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            if on_stage:
                on_stage("create")
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _create(name, NUM_CLASSES).eval()
            result.family = family_of(name)
            result.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
            size = input_size_of(name, model)
            result.checks.append("create")
            result.stage = "onnx"
            if on_stage:
                on_stage("onnx")
            onnx_stage(name, model, size, Path(tmp) / "model.onnx", result)
            result.status, result.reason = result.onnx, result.onnx_reason
            if result.onnx == "pass":
                result.checks.append("onnx")
        except UserError as err:
            result.status, result.reason = "refused", first_line(err)
        except Exception as err:  # noqa: BLE001 - a sweep reports every failure and goes on
            result.reason = one_line(err)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _compare(expected: torch.Tensor, got: torch.Tensor, what: str) -> tuple[float, bool]:
    """(max abs diff, bit-equal) of head 1's eval logits and ``got``; CheckFailed if not close."""
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise CheckFailed(f"{what} gives logits of shape {shape}, head 1 gives "
                          f"{tuple(expected.shape)}")
    diff = (expected - got).abs().max().item()
    if not torch.allclose(expected, got, atol=ATOL, rtol=RTOL):
        raise CheckFailed(f"{what} logits differ from head 1's: max abs diff {diff:.3g}")
    return diff, bool(torch.equal(expected, got))


# ---------------------------------------------------------------------------------- summary

def normalise_reason(reason: str, model: str = "") -> str:
    """``reason`` with model-specific detail replaced, so one cause groups together:
    the model's name, quoted names, bracketed/parenthesised lists, class names, numbers."""
    text = reason
    for name in {model, model.split(".", 1)[-1]} - {""}:
        text = text.replace(name, "<model>")
    text = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", text)
    text = re.sub(r"\[[^\[\]]*\]", "[…]", text)
    text = re.sub(r"\([^()]*\)", "(…)", text)
    # class and layer names (GoogLeNet, Inception3, layer3); not exception types: they are the cause
    text = re.sub(r"\b(?!\w*(?:Error|Exception|Warning)\b)[A-Za-z_]*(?:[a-z][A-Z]|[A-Za-z]\d)\w*",
                  "<name>", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    return re.sub(r"\s+", " ", text).strip()


def _rate_line(label: str, results: list[SweepResult], unit: str) -> str:
    counts = Counter(r.status for r in results)
    total = len(results)
    rate = f"{100 * counts['pass'] / total:.1f}%" if total else "n/a"
    rest = ", ".join(f"{counts[s]} {s}" for s in STATUSES[1:])
    return f"- {label}: {counts['pass']}/{total} {unit} pass ({rate}); {rest}"


def _family_results(results: list[SweepResult]) -> list[SweepResult]:
    """One result per timm family: its first non-pass, or a pass if all its models passed."""
    by_family: dict[str, list[SweepResult]] = defaultdict(list)
    for r in results:
        by_family[r.family or r.model].append(r)
    return [next((r for r in rs if r.status != "pass"), rs[0]) for rs in by_family.values()]


def _group_table(results: list[SweepResult], title: str, header: str,
                 key: Callable[[SweepResult], str],
                 reason: Callable[[SweepResult], str] = lambda r: r.reason) -> list[str]:
    groups: dict[str, list[SweepResult]] = defaultdict(list)
    for r in results:
        groups[key(r)].append(r)
    lines = [f"## {title}", ""]
    if not groups:
        return lines + ["None.", ""]
    lines += [f"| count | {header} | models, and the first one's reason |", "|---:|---|---|"]
    for cause, rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        names = ", ".join(r.model for r in rs[:8]) + (f", +{len(rs) - 8} more" * (len(rs) > 8))
        lines.append(f"| {len(rs)} | {_cell(cause)} | {names}<br>e.g. {_cell(reason(rs[0]))} |")
    return lines + [""]


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _onnx_view(r: SweepResult) -> SweepResult:
    """``r`` with the ONNX stage's outcome as its status and reason (for the rate lines)."""
    return SweepResult(r.model, r.family, r.library, r.params_m, r.onnx or "not run", "onnx",
                       r.onnx_reason)


def onnx_section(results: Sequence[SweepResult], onnx_only: bool = False) -> list[str]:
    """The ONNX stage's Markdown: pass rates, exactness, refusals grouped by the exporter's
    reason, failures, and a per-model table; [] when no result ran it. ``onnx_only``: the
    results of :func:`check_onnx_only`."""
    ran = [r for r in results if r.onnx]
    if not ran:
        return []
    views = [_onnx_view(r) for r in ran]
    timm_views = [v for v in views if v.library == "timm"]
    tv_views = [v for v in views if v.library == "torchvision"]
    passes = [r for r in ran if r.onnx == "pass"]
    ratios = [r.onnx_max_abs_diff / r.onnx_tolerance for r in passes
              if r.onnx_max_abs_diff is not None and r.onnx_tolerance]
    lines = ["## ONNX", "",
             f"{'The model (random weights)' if onnx_only else 'Head 1'} exported to ONNX (the "
             "exporter torch recommends, dynamic batch) and run by onnxruntime on the CPU at "
             "batch 1 and 3; *pass*: every output within 1e-4 x max|logit| + 1e-5 of the "
             "model's eval logits.", "",
             _rate_line("timm", _family_results(timm_views), "families"),
             _rate_line("timm models", timm_views, "models"),
             _rate_line("torchvision", tv_views, "models")]
    if ratios:
        median = sorted(ratios)[len(ratios) // 2]
        lines.append(f"- closeness: the largest difference of a pass is {max(ratios):.2g} of "
                     f"its tolerance (median {median:.2g})")
    # tolerance = 1e-4 x max|logit| + 1e-5: logits below WEAK_SCALE leave mostly the floor
    weak = sum(r.onnx_tolerance is not None and r.onnx_tolerance < 1e-4 * WEAK_SCALE + 1e-5
               for r in passes)
    lines += [f"- weak: {weak}/{len(passes)} passes have logits below {WEAK_SCALE:g} in "
              "magnitude (BatchNorm with initial statistics, zero-initialised heads), where the "
              "tolerance is mostly its 1e-5 floor", ""]
    lines += _group_table([r for r in ran if r.onnx == "refused"], "ONNX refusals by reason",
                          "reason", _onnx_cause, lambda r: r.onnx_reason)
    lines += _group_table([r for r in ran if r.onnx == "fail"], "ONNX failures by cause",
                          "cause", _onnx_cause, lambda r: r.onnx_reason)
    lines += ["<details><summary>ONNX by model</summary>", "",
              "| model | family | params (M) | ONNX | max abs diff | tolerance | seconds |",
              "|---|---|---:|---|---:|---:|---:|"]
    for r in ran:
        lines.append(f"| {r.model} | {r.family} | {_num(r.params_m)} | {r.onnx} | "
                     f"{_num(r.onnx_max_abs_diff)} | {_num(r.onnx_tolerance)} | "
                     f"{_num(r.onnx_seconds)} |")
    return lines + ["", "</details>", ""]


def _onnx_cause(r: SweepResult) -> str:
    """An ONNX reason normalised, without where in the model's code it arose (so one cause of
    the exporter groups across model files)."""
    return normalise_reason(re.sub(r" \(at [\w.]+:\d+ in \w+: .*\)(?=; nothing written)", "",
                                   r.onnx_reason), r.model)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def summarise(results: Sequence[SweepResult], command: str | None = None,
              onnx_only: bool = False) -> str:
    """A Markdown summary: pass rates (timm by family, torchvision by model), failures grouped
    by normalised cause, refusals grouped by message, timeouts, the ONNX stage where it ran,
    and the command line. ``onnx_only``: results of :func:`check_onnx_only` (only the ONNX
    section, and models that could not be built)."""
    results = list(results)
    if onnx_only:
        lines = ["# collabsurgery model sweep: ONNX", ""]
        if command:
            lines += [f"Command: `{command}`", ""]
        lines += [f"torch {torch.__version__}, timm {timm.__version__}, torchvision "
                  f"{torchvision.__version__}, onnxruntime {_version('onnxruntime')}, onnxscript "
                  f"{_version('onnxscript')}; each model with random weights, "
                  f"{NUM_CLASSES} classes, at its default input size (the reduced setting: "
                  "nothing wrapped or trained).", ""]
        unbuilt = [r for r in results if not r.onnx]
        return "\n".join(lines + onnx_section(results, onnx_only=True) + _group_table(
            unbuilt, "Not built", "reason", lambda r: normalise_reason(r.reason, r.model)))
    timm_results = [r for r in results if r.library == "timm"]
    tv_results = [r for r in results if r.library == "torchvision"]
    passes = [r for r in results if r.status == "pass"]
    lines = ["# collabsurgery model sweep", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"torch {torch.__version__}, timm {timm.__version__}, torchvision "
              f"{torchvision.__version__}; {HEADS} heads at the middle split point, batch {BATCH}, "
              f"{NUM_CLASSES} classes, each model at its default input size.", "",
              "## Pass rates", "",
              _rate_line("timm", _family_results(timm_results), "families"),
              _rate_line("timm models", timm_results, "models"),
              _rate_line("torchvision", tv_results, "models"),
              f"- exact: {sum(bool(r.bit_equal) for r in passes)}/{len(passes)} passes have "
              f"bit-equal logits (all are within atol=rtol={ATOL:g})",
              f"- weak: {sum((r.logit_scale or 0) < WEAK_SCALE for r in passes)}/{len(passes)} "
              f"passes have eval logits below {WEAK_SCALE:g} in magnitude, where atol={ATOL:g} "
              "checks little (column logit_scale)", ""]
    failed = [r for r in results if r.status == "fail"]
    lines += _group_table(failed, "Failures by cause", "stage: cause",
                          lambda r: f"{r.stage}: {normalise_reason(r.reason, r.model)}")
    refused = [r for r in results if r.status == "refused"]
    lines += _group_table(refused, "Refusals by message", "message",
                          lambda r: normalise_reason(r.reason, r.model))
    timeouts = [r for r in results if r.status == "timeout"]
    lines += _group_table(timeouts, "Timeouts", "stage", lambda r: r.stage)
    lines += onnx_section(results)
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------- child entry

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m collabsurgery.measure.sweep NAME [--threads N] [--onnx | --onnx-only]``: check
    one model, print progress lines and its ``SWEEP-RESULT {json}`` line on stdout (with
    ``--onnx`` also one before the ONNX stage; the last one counts)."""
    parser = argparse.ArgumentParser(description="Check one model for the sweep.")
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--onnx", action="store_true", help="add the ONNX stage after a pass")
    parser.add_argument("--onnx-only", action="store_true",
                        help="the reduced ONNX check alone (check_onnx_only)")
    args = parser.parse_args(argv)

    def report(stage: str) -> None:
        print(STAGE_PREFIX + stage, flush=True)

    def emit(result: SweepResult) -> None:
        print(RESULT_PREFIX + result.to_json(), flush=True)

    if args.onnx_only:
        emit(check_onnx_only(args.model, threads=args.threads, on_stage=report))
    else:
        emit(check_model(args.model, threads=args.threads, on_stage=report, onnx=args.onnx,
                         on_result=emit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
