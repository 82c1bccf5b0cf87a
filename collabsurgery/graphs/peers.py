"""Peer groups: K students with backbones of their own, any mix of architectures.

The graph for DML, KDCL, offline distillation into a group and the like: no layer is shared, so
``net(x)`` is just every student on the batch, ``[K, B, C]``; with a per-head batch
``[K, B, ...]`` student k runs on ``x[k]`` (its own augmentation or its own subset). Each head
exports as its own architecture.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn as nn
from pydantic import Field

from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.base import (INPUT, CostPiece, GraphConfig, GraphOutput, TrainingGraph,
                                       register_graph)
from collabsurgery.graphs.build import InputSize, ModelKwargs
from collabsurgery.models import backbones
from collabsurgery.models.pretrained import load_pretrained
from collabsurgery.models.backbones import BackboneSpec


class PeerGroup(TrainingGraph):
    """Students ``students[k]``, each a plain unmodified backbone; ``forward`` -> ``[K, B, C]``.

    ``run(x, wants)`` returns, besides ``"input"``, the output of any module name that every
    student has (forward hooks on the students' own modules), stacked over students.
    """

    per_head_input = True
    compiled = False

    def __init__(self, students: Sequence[nn.Module], specs: Sequence[BackboneSpec],
                 config: GraphConfig):
        super().__init__()
        self.students = nn.ModuleList(students)
        self.specs = list(specs)
        self.config = config

    @property
    def num_heads(self) -> int:
        """Number of students K."""
        return len(self.students)

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        """Every student's logits (and the requested module outputs) on its batch."""
        per_head, x = self.split_input(x)
        names = [w for w in wants if w != INPUT]
        for name in names:
            for student in self.students:
                if name not in dict(student.named_modules()) or not name:
                    raise UserError(f"feature '{name}' is not a module of every student; "
                                    f"valid: {INPUT} or a module name all students share")
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        hooks = [student.get_submodule(name).register_forward_hook(
                     lambda _m, _i, out, name=name: captured[name].append(out))
                 for student in self.students for name in names]
        try:
            logits = torch.stack([s(x[k] if per_head else x) for k, s in enumerate(self.students)])
        finally:
            for hook in hooks:
                hook.remove()
        features = {name: torch.stack(values) for name, values in captured.items()}
        if INPUT in wants:
            features[INPUT] = x if per_head else x.expand(self.num_heads, *x.shape)
        return GraphOutput(logits, features)

    def run_heads(self, x: torch.Tensor, heads: Sequence[int], source: int | None = None
                  ) -> torch.Tensor:
        """Logits of the students ``heads`` on one shared batch ``x`` (only those run; peers
        share no layers, so nothing of ``source``'s run can be reused)."""
        return torch.stack([self.students[self.check_head(h)](x) for h in heads])

    def head_spec(self, head: int) -> BackboneSpec:
        """Student ``head``'s own architecture."""
        return self.specs[self.check_head(head)]

    def head_state_dict(self, head: int) -> dict[str, torch.Tensor]:
        """Student ``head``'s state_dict: it is the plain model."""
        return self.students[self.check_head(head)].state_dict()

    def set_execution(self, mode: str | None = None, checkpoint_branches: bool | str | None = None,
                      compile: bool | dict | None = None) -> "PeerGroup":
        """Students run one after another (``loop``); ``compile`` (True, or ``torch.compile``
        arguments) compiles each student in place, one region per student."""
        super().set_execution(mode, checkpoint_branches)
        if compile:
            for student in self.students:
                student.compile(**(compile if isinstance(compile, dict) else {}))
            self.compiled = True
        return self

    def describe_execution(self) -> str:
        """How the students run, in words."""
        return "execution: loop" + (", every student compiled" if self.compiled else "")

    @torch.no_grad()
    def cost_pieces(self, x: torch.Tensor) -> list[CostPiece]:
        """Every student once; the plain model is student 0."""
        return [CostPiece(f"student {k}: {spec.qualified_name}", student, x, 1, in_plain=k == 0)
                for k, (student, spec) in enumerate(zip(self.students, self.specs))]


def _names(model: Any) -> list[Any]:
    if isinstance(model, str):
        model = [m.strip() for m in model.split(",") if m.strip()]
    if isinstance(model, nn.Module) or not isinstance(model, Sequence) or len(model) < 2:
        raise UserError("pattern 'peers' needs a list of at least two models (timm names, "
                        f"torchvision.<name> or modules), got {model!r}")
    return list(model)


def _num_classes(module: nn.Module, size: tuple[int, ...]) -> int:
    """The class count of a classifier, from a probe forward of one image in eval mode."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, *size))
    module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(f"{type(module).__name__} does not return logits [B, C] "
                        f"(got {type(out).__name__}); a peer must be a classifier")
    return out.shape[1]


_UNTRAINED = ("", "null", "none", "false")


def _per_student(pretrained: Any, students: int) -> list[Any]:
    """One pretrained source per student: a single value applies to every student; a list (or
    a string of entries joined by commas) gives one per student, null/false: untrained."""
    if isinstance(pretrained, str) and "," in pretrained:
        pretrained = [None if p.strip().lower() in _UNTRAINED else
                      True if p.strip().lower() == "true" else p.strip()
                      for p in pretrained.split(",")]
    if pretrained is None or isinstance(pretrained, (bool, str)):
        return [pretrained] * students
    if len(pretrained) != students:
        raise ArgumentError("pretrained", f"gives {len(pretrained)} entries for {students} "
                                          "students; valid: one entry per student (null: "
                                          "untrained), or one value for every student")
    return list(pretrained)


@register_graph("peers", example=lambda backbone, points: {"model": [backbone, "cifar_resnet20"]})
def build_peers(model: str | Sequence[str | nn.Module], input_size: InputSize = None,
                pretrained: Annotated[bool | str | Sequence[bool | str | None] | None, Field(
                    description="initial weights of every student, or a list with one entry "
                                "per student (null: untrained; on the command line "
                                "comma-separated): a weights file or true (timm's local "
                                "cache)")] = None,
                model_kwargs: ModelKwargs = None) -> PeerGroup:
    """A group of students, one per entry of ``model`` (a list, or names joined by commas).

    Every student is built by its own factory with ``model_kwargs`` (so two equal names give
    two differently initialised students); a module given twice is copied and re-initialised.
    All students must predict the same number of classes. ``pretrained``: one source for every
    student or a list, one per student (:mod:`collabsurgery.models.pretrained`); the config
    does not record it (a rebuilt group loads its own weights).
    """
    entries = _names(model)
    sources = _per_student(pretrained, len(entries))
    resolved = [backbones.resolve(m, **(model_kwargs or {}) if isinstance(m, str) else {})
                for m in entries]
    size = tuple(input_size) if input_size else backbones.default_input_size(resolved[0][0])
    students, specs, seen = [], [], set()
    for (module, spec), source in zip(resolved, sources):
        if id(module) in seen:
            module = backbones.fresh_instance(module, spec)
        seen.add(id(module))
        load_pretrained(module, spec, source, size)
        students.append(module)
        specs.append(spec)
    classes = [_num_classes(s, size) for s in students]
    if len(set(classes)) > 1:
        listing = ", ".join(f"{spec.qualified_name}: {c}" for spec, c in zip(specs, classes))
        raise UserError(f"peers must predict the same number of classes, got {listing}; "
                        "give num_classes")
    config = GraphConfig("peers", {"model": [s.qualified_name for s in specs],
                                   "model_kwargs": dict(model_kwargs or {}),
                                   "input_size": list(size)})
    net = PeerGroup(students, specs, config)
    net.train(students[0].training)
    return net
