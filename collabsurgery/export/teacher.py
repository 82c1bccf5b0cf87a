"""The frozen teacher of knowledge distillation, loaded from where a recipe says it is.

``objective.teacher`` is an export file, a training run directory (head ``teacher_head``,
default the head export would take), or a model name with a safetensors ``teacher_weights``
file and factory arguments ``teacher_kwargs``. The engine calls :func:`load_teacher` and passes
the module to the objective (objectives load nothing themselves).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from collabsurgery.common.tensorfile import load_state
from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.export import load_backbone
from collabsurgery.export.from_run import default_head, load_run, run_weights
from collabsurgery.models import backbones

_VALID_TEACHERS = ("valid: a file written by collabsurgery export, a training run directory, "
                   "or a model name (timm or torchvision.<name>) with teacher_weights")


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.endswith(".safetensors") or Path(text).exists()


def _is_model_name(text: str) -> bool:
    try:
        backbones.parse_model_name(text)
    except UserError:
        return False
    return True


def _check_types(teacher: Any, head: Any, weights: Any, kwargs: Any) -> None:
    """UserError for an argument of the wrong type (a recipe can hold any YAML value)."""
    if not isinstance(teacher, (str, os.PathLike)):
        raise ArgumentError("teacher", f"must be a path or a model name, got {teacher!r}; "
                                       f"{_VALID_TEACHERS}")
    if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
        raise ArgumentError("teacher_head", f"must be a head index, got {head!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ArgumentError("teacher_weights", f"must be a path to a safetensors file, got "
                                               f"{weights!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ArgumentError("teacher_kwargs", f"must be a mapping of factory arguments, got "
                                              f"{kwargs!r}")


def _teacher_from_run(run_dir: Path, head: int | None) -> nn.Module:
    """Head ``head`` of a training run (default: the head its method keeps, see
    :func:`~collabsurgery.export.from_run.default_head`) as a plain model, of the weights the
    run exports by default (its EMA weights under ``train.ema_select``)."""
    weights = run_weights(run_dir)
    graph, history = load_run(run_dir, weights)
    if head is None:
        head = default_head(run_dir, history, graph.num_heads, weights)
    if not 0 <= head < graph.num_heads:
        raise ArgumentError("teacher_head", f"must be a head of the teacher run, got {head}; "
                                            f"valid: 0..{graph.num_heads - 1}")
    model = backbones.create(graph.head_spec(head))
    model.load_state_dict(graph.head_state_dict(head), strict=True)
    return model


def _teacher_from_weights(name: str, weights: str, kwargs: dict[str, Any] | None) -> nn.Module:
    """Model ``name`` built with ``kwargs``, loaded strictly from a safetensors state_dict."""
    spec = backbones.parse_model_name(name, kwargs)
    if not Path(weights).is_file():
        raise ArgumentError("teacher_weights", f"names no existing file: {weights}; valid: a "
                                               f"safetensors file with the state_dict of {name}")
    state = load_state(weights)
    model = backbones.create(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).strip().splitlines()[:2])
        raise ArgumentError("teacher_weights", f"{weights} do not fit {name} "
                                               f"{spec.kwargs_json()}: {first}") from None
    return model


def load_teacher(teacher: str | nn.Module, teacher_head: int | None = None,
                 teacher_weights: str | None = None,
                 teacher_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The teacher as a plain model in eval mode with ``requires_grad`` off.

    ``teacher`` is an export file, a run directory (head ``teacher_head``, default the head
    its method keeps: the best on hold-out, OKDDip's leader), or a model name whose weights are the safetensors file
    ``teacher_weights`` (factory arguments ``teacher_kwargs``); from Python also a ready
    module, used as it is. UserError for anything else.
    """
    if isinstance(teacher, nn.Module):
        if (teacher_head, teacher_weights, teacher_kwargs) != (None, None, None):
            raise UserError("teacher_head, teacher_weights and teacher_kwargs do not apply to "
                            "a teacher given as a module")
        return teacher.eval().requires_grad_(False)
    _check_types(teacher, teacher_head, teacher_weights, teacher_kwargs)
    teacher = os.fspath(teacher)
    path = Path(teacher)
    if _looks_like_path(teacher):
        for name, value in (("teacher_weights", teacher_weights),
                            ("teacher_kwargs", teacher_kwargs)):
            if value is not None:
                raise ArgumentError(name, f"applies only to a teacher given by model name; "
                                          f"teacher {teacher} is a path (an export or a run "
                                          "carries its own)")
        if teacher_head is not None and not path.is_dir():
            raise ArgumentError("teacher_head", f"applies only to a teacher run directory, "
                                                f"not {teacher}")
        if path.is_dir():
            model = _teacher_from_run(path, teacher_head)
        elif path.is_file():
            model = load_backbone(path)
        else:
            raise ArgumentError("teacher", f"names no existing file or directory: {teacher}; "
                                           f"{_VALID_TEACHERS}")
    elif teacher_weights is None:
        if _is_model_name(teacher):
            raise ArgumentError("teacher_weights", f"is missing: teacher {teacher!r} is a model "
                                "name and needs a safetensors file with its state_dict")
        raise ArgumentError("teacher", f"must be an existing file or directory or a model name, "
                                       f"got {teacher!r}; {_VALID_TEACHERS}")
    elif teacher_head is not None:
        raise ArgumentError("teacher_head", f"applies only to a teacher run directory, not "
                                            f"{teacher!r}")
    else:
        model = _teacher_from_weights(teacher, os.fspath(teacher_weights), teacher_kwargs)
    return model.eval().requires_grad_(False)
