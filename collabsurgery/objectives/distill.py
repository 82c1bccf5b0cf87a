"""Offline knowledge distillation from a frozen teacher (Hinton, Vinyals & Dean, 2015)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from collabsurgery import backbones
from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.export import load_backbone, load_state
from collabsurgery.objectives.base import (LossContext, Objective, check_number,
                                           cross_entropy_per_head, kl_per_head)
from collabsurgery.runs import default_head, load_run

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
    :func:`~collabsurgery.runs.default_head`) as a plain model."""
    graph, history = load_run(run_dir)
    if head is None:
        head = default_head(run_dir, history, graph.num_heads)
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


def _num_classes(model: nn.Module) -> int | None:
    """A classifier's class count: timm's ``num_classes``, else a probe forward; None if the
    probe fails (the loss then checks the teacher's output on the first batch)."""
    known = getattr(model, "num_classes", None)
    if isinstance(known, int) and not isinstance(known, bool) and known > 0:
        return known
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *backbones.default_input_size(model), device=device))
    except Exception:  # noqa: BLE001 - e.g. a fixed input size we cannot guess
        return None
    return out.shape[-1] if isinstance(out, Tensor) and out.dim() == 2 else None


class DistillationLoss(Objective):
    """Every head learns from the labels and from a frozen teacher.

    For head h with logits z_h, teacher logits t on the same input (B examples)::

        L_h = alpha * T^2 * KL(softmax(t / T) || softmax(z_h / T)) + (1 - alpha) * CE(y, z_h)
        KL  = (1/B) sum_b sum_i q[b, i] * (log q[b, i] - log softmax(z_h[b] / T)_i)   # batchmean
        L   = sum_h L_h

    Hinton et al. leave T and the weighting open; the defaults T=4, alpha=0.9 are the CIFAR-100
    KD baseline of Tian et al., "Contrastive Representation Distillation" (ICLR 2020; their
    RepDistiller code: kd_T=4, 0.9 on the KL term, 0.1 on CE).

    The teacher runs under ``torch.no_grad`` on the graph's ``"input"``: once for a shared
    batch (a stride-0 view over heads), on every head's own batch otherwise. It is held in a
    tuple, so it is no submodule: not in ``state_dict()`` or ``parameters()``, never
    checkpointed, exported, synced or optimised; it stays in eval mode and follows the logits
    to their device on first use.
    """

    wants = ("input",)

    def __init__(self, teacher: str | nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 teacher_head: int | None = None, teacher_weights: str | None = None,
                 teacher_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.temperature = check_number("temperature", temperature, 0, low_open=True)
        self.alpha = check_number("alpha", alpha, 0, 1)
        self.teacher_source = (type(teacher).__name__ if isinstance(teacher, nn.Module)
                               else str(teacher))
        self._teacher = (load_teacher(teacher, teacher_head, teacher_weights, teacher_kwargs),)
        self._teacher_classes: int | None = None
        self._probed = False

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule)."""
        return self._teacher[0]

    def train(self, mode: bool = True) -> "DistillationLoss":
        """Set the objective's own modules to ``mode``; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def check_compatible(self, num_heads: int, num_classes: int) -> None:
        """Also a UserError when the teacher predicts another number of classes."""
        super().check_compatible(num_heads, num_classes)
        if not self._probed:  # the engine's check and every forward's: probe only once
            self._teacher_classes, self._probed = _num_classes(self.teacher), True
        if self._teacher_classes not in (None, num_classes):
            raise UserError(f"teacher {self.teacher_source} predicts {self._teacher_classes} "
                            f"classes but the students predict {num_classes}; valid: a teacher "
                            "trained on the same classes")

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """Teacher logits ``[H, B, C]`` for a graph input ``[H, B, ...]``, float32."""
        teacher = self.teacher
        param = next(teacher.parameters(), None)
        if param is not None and param.device != x.device:
            teacher.to(x.device)
        h, b = x.shape[:2]
        if x.stride(0) == 0:  # the same batch for every head: run the teacher once
            return teacher(x[0].float()).float().expand(h, b, -1)
        return teacher(x.flatten(0, 1).float()).float().view(h, b, -1)

    def head_losses(self, logits: Tensor, labels: Tensor, context: LossContext
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        t, alpha = self.temperature, self.alpha
        teacher = self.teacher_logits(context.features["input"])
        if teacher.shape[-1] != logits.shape[-1]:
            raise UserError(f"teacher {self.teacher_source} gives {teacher.shape[-1]} classes, "
                            f"the students {logits.shape[-1]}")
        soft = kl_per_head(torch.softmax(teacher / t, dim=-1), logits, t)  # [H], batchmean
        hard = cross_entropy_per_head(logits, labels)
        return alpha * soft + (1.0 - alpha) * hard, {"hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return (f"teacher={self.teacher_source!r}, temperature={self.temperature}, "
                f"alpha={self.alpha}")
