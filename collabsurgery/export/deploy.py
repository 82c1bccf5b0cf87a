"""A plain model as a deployment artifact, verified before it is kept: ONNX or torch.export.

``onnx``
    ``torch.onnx.export`` with the exporter the installed torch recommends: where its default
    is ``dynamo=True`` (torch >= 2.9; needs ``onnxscript``) the ``torch.export``-based exporter
    with ``dynamic_shapes`` (a ``torch.export.Dim`` for the batch), otherwise the TorchScript
    exporter with ``dynamic_axes``. One file (no external data), opset ``opset`` (None: the
    exporter's default). The input is named ``input``, the outputs ``logits`` (a model that
    returns one tensor) or ``features.<i>`` (a feature extractor's list of maps); the batch
    dimension is dynamic. ``metadata`` goes into the model's ``metadata_props``.
``torch-export``
    ``torch.export.export`` of the module with a dynamic batch dimension
    (``torch.export.Dim("batch")``), written with ``torch.export.save``; ``metadata`` is the
    archive's extra file ``collabsurgery.json``. The example inputs are left out of the archive
    (torch would write them with ``torch.save``, a pickle); the program and its weights are
    JSON and raw tensor bytes.

Verification: the file is written to a temporary file in the target's folder and read back the
way a deployment reads it (onnxruntime's CPU execution provider; ``torch.export.load``). Its
outputs on seeded batches of :data:`VERIFY_BATCHES` examples (sizes other than the export's
example batch, so the dynamic batch is exercised) are compared with the eval-mode module's.
Each output may differ by at most ``1e-4 x max|reference output| + 1e-5`` (:func:`tolerance`:
float32 kernels of another runtime sum in another order; a wrong weight or op differs by orders
of magnitude more). Only then is the file renamed into place (:mod:`collabsurgery.common.atomic`);
when the exporter refuses the model (:class:`NotExportable`, with the exporter's own reason) or
the outputs differ (:class:`OutputsDiffer`), nothing is written.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from collabsurgery.common.atomic import atomic_path
from collabsurgery.errors import UserError

FORMATS = ("onnx", "torch-export")
INPUT_NAME = "input"
EXAMPLE_BATCH = 2  # the example batch of the export; 0 and 1 would be specialised
VERIFY_BATCHES = (1, 3)
TOL_REL, TOL_ABS = 1e-4, 1e-5
METADATA_FILE = "collabsurgery.json"  # torch-export: the extra file holding the metadata
INSTALL = "pip install collabsurgery[onnx]"


class NotExportable(UserError):
    """The exporter (or the runtime that reads its file) cannot handle the model."""


class OutputsDiffer(UserError):
    """The exported file's outputs differ from the module's beyond tolerance (not kept)."""


@dataclass(frozen=True)
class Verified:
    """A kept artifact and how it compared with the module on :data:`VERIFY_BATCHES`."""

    path: Path
    format: str
    input_size: tuple[int, ...]
    output_names: tuple[str, ...]
    max_abs_diff: float
    tolerance: float  # the smallest tolerance of the outputs compared
    opset: int | None = None  # onnx: the ai.onnx opset of the file

    def describe(self) -> str:
        """``ONNX opset 20, input 'input' [batch, 3, 32, 32] -> 'logits'; ... max abs diff``."""
        kind = f"ONNX opset {self.opset}" if self.format == "onnx" else "torch.export program"
        runtime = "onnxruntime" if self.format == "onnx" else "torch.export.load"
        outputs = ", ".join(f"'{n}'" for n in self.output_names[:4])
        outputs += f", ... ({len(self.output_names)})" if len(self.output_names) > 4 else ""
        return (f"{kind}, input '{INPUT_NAME}' [batch, {', '.join(map(str, self.input_size))}] "
                f"-> {outputs}; {runtime} vs the model at batch "
                f"{' and '.join(map(str, VERIFY_BATCHES))}: max abs diff {self.max_abs_diff:.3g} "
                f"(tolerance {'from ' if len(self.output_names) > 1 else ''}"
                f"{self.tolerance:.3g}{' per output' if len(self.output_names) > 1 else ''})")


def tolerance(reference: torch.Tensor) -> float:
    """How far an artifact's output may be from ``reference``: 1e-4 x max|reference| + 1e-5."""
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    return TOL_REL * scale + TOL_ABS


def onnx_exporter() -> str:
    """``"dynamo"`` where the installed torch's ``torch.onnx.export`` defaults to
    ``dynamo=True`` (its recommended exporter), else ``"torchscript"``."""
    parameter = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    return "dynamo" if parameter is not None and parameter.default is True else "torchscript"


def require_onnx() -> None:
    """UserError in one line, saying how to install them, unless the packages ONNX export
    needs import: onnx, onnxruntime and (for the dynamo exporter) onnxscript."""
    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if onnx_exporter() == "dynamo" else [])
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX export needs {', '.join(needed)} ({', '.join(missing)} not "
                        f"installed); install them with: {INSTALL}")


def check_target(format: str, path: str | Path) -> Path:
    """``path`` as a Path once ``format`` is known, its folder exists and, for ONNX, the
    packages are installed; a one-line UserError otherwise (checked before any work)."""
    if format not in FORMATS:
        raise UserError(f"unknown format '{format}'; valid: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; valid: a "
                        "file in an existing folder")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; valid: a file path such as "
                        f"{path / ('model.onnx' if format == 'onnx' else 'model.pt2')}")
    if format == "onnx":
        require_onnx()
    return path


def output_names(outputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[str, ...]:
    """``("logits",)`` for one tensor, ``("features.0", ...)`` for a list of feature maps."""
    if isinstance(outputs, torch.Tensor):
        return ("logits",)
    if isinstance(outputs, (list, tuple)) and outputs and all(
            isinstance(t, torch.Tensor) for t in outputs):
        return tuple(f"features.{i}" for i in range(len(outputs)))
    raise NotExportable(f"the model returns {type(outputs).__name__}, not a tensor of logits "
                        "or a list of feature maps; valid: a classifier or a feature extractor")


def _example_outputs(model: nn.Module, x: torch.Tensor, what: str) -> tuple[str, ...]:
    """The output names of ``model`` on the example batch ``x`` (UserError if it cannot run)."""
    try:
        with torch.no_grad():
            return output_names(model(x))
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a model that does not take this input
        raise UserError(f"{what} does not run on an input of shape {list(x.shape)} "
                        f"({exporter_reason(err)}); valid: the input size it was trained "
                        "with; nothing written") from None


def _as_list(outputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _batch(size: int, input_size: Sequence[int], seed: int) -> torch.Tensor:
    return torch.randn(size, *input_size, generator=torch.Generator().manual_seed(seed))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WHERE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(\S[^\n]*)')


def exporter_reason(err: BaseException) -> str:
    """The exporter's own reason in one line: what it was doing (its outermost message's first
    sentence, when the error wraps another), the innermost cause's type and first line, and
    the deepest line of the model's code it names."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    texts = [_ANSI.sub("", str(e)).strip() for e in chain]
    root, text = chain[-1], texts[-1]
    line = f"{type(root).__name__}: {text.splitlines()[0] if text else ''}".strip(": ")
    if len(chain) > 1 and texts[0]:
        doing = re.split(r"(?<=\.)\s", texts[0].splitlines()[0])[0]
        line = f"{doing} {line}"
    where = next((found[-1] for t in reversed(texts) if (found := _WHERE.findall(t))), None)
    if where:
        line += f" (at {Path(where[0]).name}:{where[1]} in {where[2]}: {where[3].strip()})"
    line = re.sub(r"\s+", " ", line)
    return line if len(line) <= 400 else line[:397] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines, logging and warnings held back (a refusal is one line)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _compare(what: str, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
             names: Sequence[str]) -> tuple[float, float]:
    """(max abs diff, smallest tolerance) over every output; OutputsDiffer beyond tolerance."""
    worst, tightest = 0.0, float("inf")
    if len(got) != len(expected):
        raise OutputsDiffer(f"{what} gives {len(got)} outputs, the model {len(expected)}")
    for name, g, e in zip(names, got, expected):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(e.shape):
            raise OutputsDiffer(f"{what} gives '{name}' of shape {tuple(g.shape)}, the model "
                                f"{tuple(e.shape)}; nothing written")
        diff = (g.float() - e.float()).abs().max().item() if e.numel() else 0.0
        tol = tolerance(e)
        if not diff <= tol:  # NaN fails too
            raise OutputsDiffer(f"{what} differs from the model in '{name}': max abs diff "
                                f"{diff:.3g} > tolerance {tol:.3g} (1e-4 x max|output| + 1e-5); "
                                "nothing written")
        worst, tightest = max(worst, diff), min(tightest, tol)
    return worst, tightest


def _verify(run, model: nn.Module, input_size: Sequence[int], names: Sequence[str],
            what: str) -> tuple[float, float]:
    """Compare ``run(x) -> list of outputs`` with the model's on each verification batch."""
    worst, tightest = 0.0, float("inf")
    for seed, size in enumerate(VERIFY_BATCHES, start=1):
        x = _batch(size, input_size, seed)
        with torch.no_grad():
            expected = _as_list(model(x))
        try:
            got = run(x)
        except Exception as err:  # noqa: BLE001 - the runtime's refusal, in one line
            raise NotExportable(f"{what} cannot run the exported model at batch {size} "
                                f"({exporter_reason(err)}); nothing written") from None
        diff, tol = _compare(f"{what} at batch {size}", got, expected, names)
        worst, tightest = max(worst, diff), min(tightest, tol)
    return worst, tightest


# ---------------------------------------------------------------------------------- ONNX

def _onnx_export(model: nn.Module, x: torch.Tensor, path: Path, names: Sequence[str],
                 opset: int | None) -> None:
    kwargs: dict = dict(input_names=[INPUT_NAME], output_names=list(names),
                        opset_version=opset)
    params = inspect.signature(torch.onnx.export).parameters
    if onnx_exporter() == "dynamo":
        kwargs.update(dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        if "external_data" in params:
            kwargs["external_data"] = False
    else:  # torch < 2.9: the TorchScript exporter is the default (and the only one < 2.5)
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (INPUT_NAME, *names)}
        if "dynamo" in params:
            kwargs["dynamo"] = False
    torch.onnx.export(model, (x,), str(path), **kwargs)


def _onnx_opset(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _onnx_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT_NAME: x.numpy()})


def save_onnx(model: nn.Module, path: str | Path, input_size: Sequence[int], *,
              opset: int | None = None, metadata: dict[str, str] | None = None,
              what: str = "the model") -> Verified:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with a dynamic batch, verified with
    onnxruntime against the module before it is kept (see the module docstring).

    ``input_size`` is one example's shape, e.g. ``(3, 224, 224)``; ``opset`` the ai.onnx opset
    (None: the exporter's default); ``metadata`` string pairs for ``metadata_props``; ``what``
    names the model in errors. Raises :class:`NotExportable` with the exporter's reason,
    :class:`OutputsDiffer`, or a UserError for a bad path or missing packages.
    """
    path = check_target("onnx", path)
    import onnx

    input_size = tuple(int(s) for s in input_size)
    with _eval(model), _quiet():
        x = _batch(EXAMPLE_BATCH, input_size, 0)
        names = _example_outputs(model, x, what)
        with atomic_path(path) as tmp:
            try:
                _onnx_export(model, x, tmp, names, opset)
                proto = onnx.load(str(tmp))
            except Exception as err:  # noqa: BLE001 - the exporter's refusal, in one line
                raise NotExportable(f"{what} cannot be exported to ONNX by torch.onnx.export "
                                    f"({onnx_exporter()} exporter): {exporter_reason(err)}; "
                                    "nothing written") from None
            opset_found = _onnx_opset(proto)
            if opset is not None and opset_found != opset:
                raise NotExportable(f"torch.onnx.export ({onnx_exporter()} exporter) wrote "
                                    f"{what} in ai.onnx opset {opset_found}, not the {opset} "
                                    f"asked for (it could not convert the model to opset "
                                    f"{opset}); valid: opset {opset_found} or higher, or the "
                                    "exporter's default; nothing written")
            props = {**(metadata or {}), "input_names": INPUT_NAME,
                     "output_names": ",".join(names)}
            onnx.helper.set_model_props(proto, {k: str(v) for k, v in props.items()})
            onnx.save(proto, str(tmp))
            try:
                run = _onnx_runner(tmp)
            except Exception as err:  # noqa: BLE001 - an op onnxruntime does not run
                raise NotExportable(f"onnxruntime cannot load the ONNX export of {what}: "
                                    f"{exporter_reason(err)}; nothing written") from None
            diff, tol = _verify(run, model, input_size, names, "onnxruntime")
    return Verified(path, "onnx", input_size, names, diff, tol, opset_found)


# ---------------------------------------------------------------------------------- torch.export

def save_torch_export(model: nn.Module, path: str | Path, input_size: Sequence[int], *,
                      metadata: dict[str, str] | None = None,
                      what: str = "the model") -> Verified:
    """``torch.export.export`` of ``model`` (in eval mode) with a dynamic batch, saved with
    ``torch.export.save`` at ``path`` (``metadata`` as the extra file ``collabsurgery.json``)
    and verified through ``torch.export.load`` before it is kept (see the module docstring)."""
    path = check_target("torch-export", path)
    input_size = tuple(int(s) for s in input_size)
    with _eval(model), _quiet():
        x = _batch(EXAMPLE_BATCH, input_size, 0)
        names = _example_outputs(model, x, what)
        try:
            program = torch.export.export(model, (x,),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as err:  # noqa: BLE001 - the exporter's refusal, in one line
            raise NotExportable(f"{what} cannot be exported by torch.export.export: "
                                f"{exporter_reason(err)}; nothing written") from None
        with contextlib.suppress(AttributeError, ValueError):  # a torch without the setter
            program.example_inputs = None  # else saved with torch.save: a pickle in the archive
        extra = {METADATA_FILE: json.dumps({**(metadata or {}), "input_names": INPUT_NAME,
                                            "output_names": ",".join(names)}, sort_keys=True)}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: torch wants a name ending in .pt2
                torch.export.save(program, f, extra_files=extra)
            with open(tmp, "rb") as f:
                loaded = torch.export.load(f).module()
            diff, tol = _verify(lambda t: _as_list(loaded(t)), model, input_size, names,
                                "torch.export.load")
    return Verified(path, "torch-export", input_size, names, diff, tol)


def save_artifact(model: nn.Module, path: str | Path, format: str, input_size: Sequence[int],
                  *, opset: int | None = None, metadata: dict[str, str] | None = None,
                  what: str = "the model") -> Verified:
    """:func:`save_onnx` or :func:`save_torch_export` by ``format`` (one of :data:`FORMATS`)."""
    check_target(format, path)
    if format == "onnx":
        return save_onnx(model, path, input_size, opset=opset, metadata=metadata, what=what)
    if opset is not None:
        raise UserError("opset applies to format onnx only")
    return save_torch_export(model, path, input_size, metadata=metadata, what=what)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an artifact written here: a torch.export archive's
    ``collabsurgery.json``, or an ONNX file's ``metadata_props``."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # a torch.export archive is a zip file; ONNX is protobuf
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist()
                         if n.endswith(f"/extra/{METADATA_FILE}")), None)
            return json.loads(archive.read(name)) if name else {}
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
