"""timm / Hugging Face model folders from an export: what ``timm.models.save_for_hf`` writes.

:func:`save_timm_folder` turns an export file (:func:`collabsurgery.export.backbone`) into a folder that
``timm.create_model("local-dir:DIR", pretrained=True)`` loads with no other argument, and that
can be uploaded to the Hugging Face Hub unchanged (then ``hf-hub:user/repo``):

``config.json``
    timm's own ``save_config_for_hf`` output for the rebuilt model: ``architecture``,
    ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` (the export's factory
    keyword arguments, which timm passes back to the factory) and ``pretrained_cfg``, without
    the keys that describe timm's own pretrained weights (tag, license, paper, ...), which these
    weights are not, and with the recipe's image size when the export has a recipe.
``model.safetensors``
    exactly the export's tensors, with safetensors metadata ``format=pt`` (as transformers and
    the Hub expect) plus the export's metadata and a fresh checksum of both.
``README.md``
    a model card: method, recipe, data, metrics, exported head, version, how to load.
``model.onnx`` (only with ``onnx=True``)
    the same head as ONNX (:func:`collabsurgery.export.artifact.export_artifact`: dynamic
    batch, input ``input``, output ``logits``, preprocessing in its metadata), verified with
    onnxruntime against the weights before the folder is kept; the card says how to run it.

The folder is built as a temporary sibling ``DIR.tmp-<hex>``, every file synced, then renamed
into place, so a failure leaves nothing half written (a full disk: one line,
:class:`~collabsurgery.common.diskfull.DiskFull`).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn
import yaml
from timm.models import get_model_input_config
from timm.models._hub import save_config_for_hf  # save_for_hf's config half (not re-exported)

from collabsurgery.common.atomic import fsync_path, write_text
from collabsurgery.common.diskfull import refuse_when_full, tensor_bytes
from collabsurgery.common.integrity import CHECKSUM_KEY
from collabsurgery.common.tensorfile import load_state, save_safetensors_atomic
from collabsurgery.errors import UserError
from collabsurgery.export.artifact import export_artifact
from collabsurgery.export.backbone import FORMAT, export_metadata, load_plain
from collabsurgery.export.deploy import Verified, require_onnx
from collabsurgery.models import backbones

#: what the folder holds, nothing else (it is uploaded to the Hub as it is)
FOLDER_FILES = ("README.md", "config.json", "model.safetensors")
#: the ONNX file beside model.safetensors when asked for
ONNX_FILE = "model.onnx"
#: pretrained_cfg keys that describe timm's published weights, not weights trained here
_SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes",
                "description")
_METRIC_NAMES = {
    "test_acc": "test accuracy (this head)",
    "holdout_acc": "hold-out accuracy (this head)",
    "ensemble_test_acc": "test accuracy of the ensemble of all heads (not of this file alone)",
    "epoch": "epoch",
}


def save_timm_folder(export_file: str | os.PathLike, directory: str | os.PathLike, *,
                     license: str | None = None, onnx: bool = False, opset: int | None = None,
                     on_onnx: Callable[[Verified], None] | None = None) -> Path:
    """Write export ``export_file`` as a timm / Hugging Face model folder ``directory``.

    ``directory`` must not exist or be empty. Only exports of timm architectures qualify (a
    torchvision or ready-module export is a UserError). ``license`` goes into the card's front
    matter when given (none is assumed otherwise). ``onnx``: also ``model.onnx`` (``opset``:
    its ai.onnx opset), verified before the folder is kept; ``on_onnx`` receives how it
    compared. Returns ``directory``.
    """
    export_file, directory = Path(export_file), Path(directory)
    metadata = export_metadata(export_file)
    _require_timm(export_file, metadata)
    _require_empty(directory)
    if opset is not None and not onnx:
        raise UserError("opset applies to the ONNX file of a model folder; ask for it with "
                        "onnx=True (--onnx)")
    if onnx:
        require_onnx()  # before any work
    tensors = load_state(export_file)
    model = load_plain(export_file)  # rebuilds it and checks that the tensors fit
    recipe = _parse_recipe(metadata.get("recipe", ""))
    target = Path(os.path.abspath(directory))  # "out/.." or "." have no usable sibling name
    tmp = target.parent / f"{target.name}.tmp-{secrets.token_hex(4)}"
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"cannot write {directory} ({err.strerror or err}); valid: a path "
                            "in a writable directory") from None
        needed = tensor_bytes(tensors) * (2 if onnx else 1) + 256 * 1024
        with refuse_when_full(f"model folder {target.name}", target.parent, needed,
                              remove=tmp):
            _write_weights(tensors, metadata, tmp / "model.safetensors")
            _write_config(model, metadata, recipe, tmp / "config.json")
            verified = export_artifact(export_file, tmp / ONNX_FILE, "onnx", opset=opset) \
                if onnx else None
            write_text(tmp / "README.md", model_card(metadata, recipe, target.name, license,
                                                     verified))
            fsync_path(tmp)
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if verified is not None and on_onnx is not None:
        on_onnx(verified)
    return directory


def _require_timm(path: Path, metadata: dict[str, str]) -> None:
    library, name = metadata.get("library"), metadata.get("architecture", "?")
    if library == "timm":
        return
    if library == "torchvision":
        raise UserError(f"timm-folder needs a timm architecture; {path} holds "
                        f"{backbones.TORCHVISION_PREFIX}{name}, whose exports load with "
                        "cs.load_backbone or torchvision; valid: --format safetensors")
    raise UserError(f"timm-folder needs a timm architecture; {path} holds a ready module "
                    f"({name}, library {library!r}), which loads with "
                    "cs.load_backbone(path, model=...); valid: --format safetensors")


def _require_empty(directory: Path) -> None:
    try:
        if directory.is_dir() and not any(directory.iterdir()):
            return
    except OSError:  # unreadable: treat as taken
        pass
    if directory.is_file():
        raise UserError(f"{directory} is a file, not a directory; valid: a new or empty "
                        "directory")
    if directory.exists() or directory.is_symlink():
        raise UserError(f"{directory} exists and is not empty; valid: a new or empty directory")


def _move_into_place(tmp: Path, directory: Path) -> None:
    # rename(2) replaces an empty directory and refuses a non-empty one, so a folder filled by
    # someone else since _require_empty is never overwritten
    try:
        os.rename(tmp, directory)
    except OSError as err:
        raise UserError(f"{directory} exists and is not empty ({err.strerror or err}); "
                        "valid: a new or empty directory") from None
    fsync_path(directory.parent)


def _write_weights(tensors: dict[str, Any], metadata: dict[str, str], path: Path) -> None:
    kept = {k: v for k, v in metadata.items() if k not in ("format", CHECKSUM_KEY)}
    save_safetensors_atomic(tensors, path, {"format": "pt", "collabsurgery_format": FORMAT,
                                            **kept})


def _write_config(model: nn.Module, metadata: dict[str, str], recipe: dict[str, Any],
                  path: Path) -> None:
    """timm's ``save_config_for_hf``, with the factory kwargs and the training image size."""
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items()
                            if k not in _SOURCE_KEYS}
    model_args = json.loads(metadata.get("model_kwargs", "{}"))
    save_config_for_hf(model, str(path), model_args=model_args,
                       data_config=_data_config(model, recipe))
    fsync_path(path)


def _data_config(model: nn.Module, recipe: dict[str, Any]) -> dict[str, Any] | None:
    # collabsurgery.data.datasets resizes the shorter side (bilinear) and centre-crops: crop_pct 1.0
    size = (recipe.get("data") or {}).get("image_size")
    current = get_model_input_config(model)
    if not isinstance(size, int) or current["fixed_input_size"]:
        return None
    return {"input_size": (current["input_size"][0], size, size), "interpolation": "bilinear",
            "crop_pct": 1.0, "crop_mode": "center"}


def _parse_recipe(text: str) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _json_field(metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata.get(key, "null"))
    except json.JSONDecodeError:
        return None


def registering_module(architecture: str) -> str | None:
    """The module (not timm's) whose import registers ``architecture`` with timm, if any."""
    module = timm.models.model_entrypoint(architecture).__module__
    if module.split(".")[0] == "timm":
        return None
    # the papers' CIFAR models: ``import collabsurgery.models`` (``import collabsurgery`` alone
    # imports nothing heavy, so it does not register them)
    return "collabsurgery.models" if module.startswith("collabsurgery.models.") else module


def _fenced(text: str, language: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}\n"


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value)


def _section_args(section: dict[str, Any], skip: tuple[str, ...]) -> str:
    args = [f"{k}={json.dumps(v)}" for k, v in section.items() if k not in skip and v is not None]
    return f" ({', '.join(args)})" if args else ""


def describe_method(recipe: dict[str, Any]) -> str:
    """One sentence on how the run trained: objective, graph pattern, heads and split."""
    objective = recipe.get("objective") or {}
    graph = recipe.get("graph") or {}
    model = (recipe.get("model") or {}).get("name")
    text = (f"objective `{objective.get('name', 'not recorded')}`"
            f"{_section_args(objective, ('name',))} on a `{graph.get('pattern', '?')}` "
            "training graph")
    if graph.get("heads") is not None:
        text += f" of {graph['heads']} heads"
    if graph.get("split"):
        text += f" split at {_value(graph['split'])}"
    text += _section_args(graph, ("pattern", "heads", "split"))
    if model:
        text += f", model {_value(model)}"
    return f"Trained with collabsurgery: {text}."


def _front_matter(license: str | None) -> str:
    lines = ["---", "tags:", "- image-classification", "- timm", "- collabsurgery",
             "library_name: timm", "pipeline_tag: image-classification"]
    if license:
        lines.append(f"license: {license}")
    return "\n".join(lines + ["---", ""])


def _summary(metadata: dict[str, str], kwargs: Any) -> str:
    arch = metadata.get("architecture", "?")
    lines = [f"- **Architecture:** `{arch}` (timm), factory arguments `{json.dumps(kwargs)}`",
             f"- **Exported head:** {metadata.get('head', '?')} of the training graph "
             "(a plain backbone: nothing of the graph or the objective is needed to use it)",
             f"- **collabsurgery version:** {metadata.get('version', '?')}"]
    if metadata.get("run"):
        lines.append(f"- **Run:** {metadata['run']}")
    module = registering_module(arch)
    if module:
        lines.append(f"- **Note:** `{arch}` is registered with timm by `{module}`, not by timm "
                     f"itself: `import {module}` before `timm.create_model`")
    return "\n".join(lines) + "\n"


def _method_and_recipe(metadata: dict[str, str], recipe: dict[str, Any]) -> str:
    text = metadata.get("recipe", "")
    if not text.strip():
        return ("\n## Method\n\nExported from a graph file (or `cs.export` in Python), not "
                "from a training run: no recipe, data or metrics were recorded with it.\n")
    method = describe_method(recipe) if recipe else "The recipe below could not be parsed."
    return (f"\n## Method\n\n{method}\n\n## Recipe\n\nThe full recipe of the run:\n\n"
            + _fenced(text, "yaml"))


def _data(recipe: dict[str, Any]) -> str:
    data = recipe.get("data") or {}
    if not data:
        return ""
    return (f"\n## Data\n\n- **Source:** `{data.get('source', 'not recorded')}`\n"
            f"- **Image size:** {data.get('image_size', 'not recorded')} (shorter side resized, "
            "bilinear, centre crop)\n"
            "- **Normalisation:** per-channel mean/std of the training split, which the export "
            "does not record; `pretrained_cfg` in config.json holds timm's defaults for the "
            "architecture\n")


def _metric_rank(item: tuple[str, Any]) -> int:
    """The order of :data:`_METRIC_NAMES` (this head's test accuracy first), others after."""
    order = list(_METRIC_NAMES)
    return order.index(item[0]) if item[0] in order else len(order)


def _metrics(metadata: dict[str, str]) -> str:
    if not metadata.get("recipe", "").strip() and "metrics" not in metadata:
        return ""
    metrics = _json_field(metadata, "metrics")
    if not isinstance(metrics, dict) or not metrics:
        return "\n## Metrics\n\nNo metrics were recorded (the run had not evaluated yet).\n"
    rows = ["| metric | value |", "|---|---|"]
    for key, value in sorted(metrics.items(), key=_metric_rank):
        shown = f"{100 * value:.2f}%" if key.endswith("acc") and isinstance(value, float) \
            else _value(value)
        rows.append(f"| {_METRIC_NAMES.get(key, key)} | {shown} |")
    return "\n## Metrics\n\n" + "\n".join(rows) + "\n"


def _onnx_usage(verified: Verified | None) -> str:
    if verified is None:
        return ""
    code = ("import numpy as np\nimport onnxruntime as ort\n\n"
            f'session = ort.InferenceSession("{ONNX_FILE}", providers=["CPUExecutionProvider"])\n'
            f"x = np.zeros((1, {', '.join(map(str, verified.input_size))}), np.float32)  "
            "# preprocessed as the metadata_props say\n"
            'logits = session.run(["logits"], {"input": x})[0]\n')
    return (f"\n## ONNX\n\n`{ONNX_FILE}` is the same head as ONNX (opset {verified.opset}, dynamic "
            "batch; its `metadata_props` hold the preprocessing). Before this folder was "
            f"written, onnxruntime's outputs on seeded batches were compared with these weights' "
            f"logits: max abs diff {verified.max_abs_diff:.3g} (tolerance "
            f"{verified.tolerance:.3g}).\n\n" + _fenced(code, "python"))


def _usage(metadata: dict[str, str], folder_name: str) -> str:
    module = registering_module(metadata.get("architecture", ""))
    code = "import timm\n"
    if module:
        code += f"import {module}  # registers {metadata['architecture']} with timm\n"
    code += ("\n# this folder (pretrained=True loads its weights; without it timm builds the "
             "architecture with random weights)\n"
             f'model = timm.create_model("local-dir:{folder_name}", pretrained=True).eval()\n'
             "# the same folder uploaded to the Hugging Face Hub as user/repo\n"
             'model = timm.create_model("hf-hub:user/repo", pretrained=True).eval()\n')
    return "\n## How to load\n\n" + _fenced(code, "python")


def model_card(metadata: dict[str, str], recipe: dict[str, Any], folder_name: str,
               license: str | None = None, onnx: Verified | None = None) -> str:
    """The README.md of a model folder, from an export's metadata and its parsed recipe
    (``onnx``: how its ``model.onnx`` was verified, when it has one)."""
    title = metadata.get("run") or f"{metadata.get('architecture', 'model')} (collabsurgery)"
    kwargs = _json_field(metadata, "model_kwargs")
    return (_front_matter(license) + f"# Model card for {title}\n\n"
            + _summary(metadata, kwargs) + _method_and_recipe(metadata, recipe)
            + _data(recipe) + _metrics(metadata) + _usage(metadata, folder_name)
            + _onnx_usage(onnx))
