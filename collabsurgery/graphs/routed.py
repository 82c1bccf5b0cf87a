"""Random-routed students over a modular network (Collaborative Group Learning, paper 002).

The backbone is cut at its split points into L stages; every stage holds M modules (copies,
freshly initialised: module m of every stage comes from the m-th fresh instance of the model, so
the path (m, m, ..., m) starts as one coherent network). Student k is a path choosing one module
per stage (paper 002, eq. 1). Parameters are M x the backbone's whatever the number of students.

On a shared batch, students whose paths share a prefix compute it once (the prefix's output is
the same tensor); on a per-head batch ``[K, B, ...]`` student k runs its path on ``x[k]``
(its own subset).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from collabsurgery.common.seeding import generator
from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.base import INPUT, CostPiece, GraphConfig, GraphOutput, register_graph
from collabsurgery.graphs.build import (Copies, Count, InputSize, ModelKwargs, Points, Pretrained,
                                        _config, _parse_split, cut_stages, load_pretrained,
                                        reinitialise)
from collabsurgery.graphs.staged import StagedGraph
from collabsurgery.models import backbones
from collabsurgery.models.backbones import BackboneSpec

ROUTED_MODES = ("loop", "concat", "auto")


class RoutedNet(StagedGraph):
    """K students routed through L stages x M modules; ``forward`` -> ``[K, B, C]``."""

    per_head_input = True
    execution_modes = ROUTED_MODES

    def __init__(self, stages: Sequence[nn.Module], modules: int, paths: Sequence[Sequence[int]],
                 spec: BackboneSpec, reference_keys: Sequence[str], config: GraphConfig,
                 stage_names: Sequence[str], unused_state: dict[str, torch.Tensor] | None = None):
        copies = [[stage] + [copy.deepcopy(stage) for _ in range(modules - 1)] for stage in stages]
        super().__init__(copies, stage_names, spec, reference_keys, config, unused_state)
        self.paths = [tuple(int(m) for m in path) for path in paths]
        self._last: tuple[torch.Tensor, dict[tuple, torch.Tensor]] | None = None
        self.execution = "loop"

    def set_execution(self, mode: str | None = None, checkpoint_branches: bool | str | None = None,
                      compile: bool | dict | None = None) -> "RoutedNet":
        """``loop``: each module once per distinct input; ``concat``: a module several students
        use in one step runs once on their inputs concatenated (BatchNorm still normalises each
        student's part with its own statistics, so logits, gradients and running statistics are
        the loop's); ``auto`` is ``loop``."""
        if compile:
            raise UserError("a routed graph is not compiled: its routes change every step, "
                            "which would recompile each new route; valid: compile off")
        if mode not in (None, *ROUTED_MODES) or checkpoint_branches:
            raise UserError(f"a routed graph runs as {' or '.join(ROUTED_MODES)}; got {mode!r}"
                            f"{' with checkpoint_branches' if checkpoint_branches else ''}")
        if mode is not None:
            self.execution = "loop" if mode == "auto" else mode
        return self

    def describe_execution(self) -> str:
        """How modules shared by several students run."""
        return f"execution: {self.execution}"

    @contextmanager
    def reference_execution(self) -> Iterator[None]:
        """The loop inside the block."""
        mode, self.execution = self.execution, "loop"
        try:
            yield
        finally:
            self.execution = mode

    @property
    def num_heads(self) -> int:
        """Number of students K."""
        return len(self.paths)

    @property
    def may_skip_modules(self) -> bool:  # type: ignore[override]
        """True when some module is on no student's path (it never gets a gradient)."""
        return any(len({p[i] for p in self.paths}) < self.copies(i)
                   for i in range(len(self.stages)))

    def head_path(self, head: int) -> list[int]:
        """The module index of every stage on student ``head``'s path."""
        return list(self.paths[self.check_head(head)])

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        """Every student's logits ``[K, B, C]`` (and the requested split-point features, each
        ``[K, B, ...]``); a prefix shared on the same input is computed once."""
        per_head, x = self.split_input(x)
        self.check_wants(wants, self.feature_names)
        self._last = None  # let the previous step's activations go before computing new ones
        outputs = self.forward_prefixes(x, per_head, range(self.num_heads))
        if per_head and self.training:
            self._last = (x, outputs)
        heads = range(self.num_heads)
        logits = torch.stack([outputs[self._key(h, per_head, len(self.stages))] for h in heads])
        features = {}
        for name in wants:
            if name == INPUT:
                features[name] = x if per_head else x.expand(self.num_heads, *x.shape)
            else:
                i = self.feature_names.index(name) + 1
                features[name] = torch.stack([outputs[self._key(h, per_head, i)] for h in heads])
        return GraphOutput(logits, features)

    def run_heads(self, x: torch.Tensor, heads: Sequence[int], source: int | None = None
                  ) -> torch.Tensor:
        """Logits ``[len(heads), B, C]`` of the students ``heads`` on one shared batch ``x``,
        running only the modules on their paths (each shared prefix once).

        ``source``: when ``x`` is student ``source``'s batch of the last training-mode run on a
        per-student batch, the prefixes the heads share with that student's path are taken
        (detached) from that run instead of being computed again (CGL's sub-group imitation
        on student k's batch: the modules it shares with k saw exactly this batch)."""
        known = {}
        if source is not None and self._last is not None:
            last_x, last = self._last
            mine = last_x[source]
            if (x.data_ptr(), x.shape, x.stride()) == (mine.data_ptr(), mine.shape, mine.stride()):
                for depth in range(1, len(self.stages)):
                    prefix = self.paths[source][:depth]
                    known[(-1, prefix)] = last[(source, prefix)].detach()
        outputs = self.forward_prefixes(x, False, heads, known)
        return torch.stack([outputs[self._key(h, False, len(self.stages))] for h in heads])

    def forward_prefixes(self, x: torch.Tensor, per_head: bool, heads: Sequence[int],
                         known: dict[tuple, torch.Tensor] | None = None
                         ) -> dict[tuple, torch.Tensor]:
        """The output of every distinct (input, path prefix) of ``heads``, keyed by
        :meth:`_key` (the key of depth 0 is the input itself); ``known`` outputs are used as
        they are."""
        outputs: dict[tuple, torch.Tensor] = dict(known or {})
        for h in heads:
            outputs.setdefault(self._key(h, per_head, 0), x[h] if per_head else x)
        for i, copies in enumerate(self.stages):
            by_module: dict[int, dict[tuple, tuple]] = {}  # module -> new key -> its input's key
            for h in heads:
                key = self._key(h, per_head, i + 1)
                if key not in outputs:
                    by_module.setdefault(self.paths[h][i], {})[key] = self._key(h, per_head, i)
            for m, pending in by_module.items():
                inputs = [outputs[parent] for parent in pending.values()]
                if self.execution == "concat" and len(inputs) > 1:
                    results = run_concatenated(copies[m], inputs)
                else:
                    results = [copies[m](t) for t in inputs]
                outputs.update(zip(pending, results))
        return outputs

    def _key(self, head: int, per_head: bool, depth: int) -> tuple:
        """Which tensor head ``head`` holds after ``depth`` stages: its input and path prefix."""
        return (head if per_head else -1, self.paths[head][:depth])

    @torch.no_grad()
    def cost_pieces(self, x: torch.Tensor) -> list[CostPiece]:
        """Every stage, weighted by the distinct path prefixes that run it on a shared batch."""
        pieces, current = [], x
        for i, (name, copies) in enumerate(zip(self.stage_names, self.stages)):
            runs = len({p[:i + 1] for p in self.paths})
            pieces.append(CostPiece(name, copies[0], current, len(copies), runs=runs))
            current = copies[0](current)
        return pieces

    def describe_structure(self) -> list[str]:
        """Each student's path, then which students share each module of each stage."""
        lines = [f"{self.num_heads} students over {len(self.stages)} stages x "
                 f"{max(self.copies(i) for i in range(len(self.stages)))} modules; paths:"]
        lines += [f"  student {k}: {' '.join(map(str, p))}" for k, p in enumerate(self.paths)]
        lines += [f"costs below: one shared batch (each distinct path prefix runs once); with "
                  f"per-student batches (data.subsets) every student runs its whole path, "
                  f"{self.num_heads} x the plain model's FLOPs per example"]
        return lines + super().describe_structure()


def run_concatenated(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[module(t) for t in inputs]`` computed as one call on the inputs concatenated along the
    batch: in training, every BatchNorm inside normalises (and updates its running statistics
    with) each input's part separately, in order, exactly as separate calls would."""
    sizes = [t.shape[0] for t in inputs]
    patched = [bn for bn in module.modules()
               if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training]
    for bn in patched:
        bn.forward = partial(_chunked_batchnorm, bn, sizes)
    try:
        return list(module(torch.cat(list(inputs))).split(sizes))
    finally:
        for bn in patched:
            del bn.forward


def _chunked_batchnorm(bn: nn.Module, sizes: list[int], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([type(bn).forward(bn, part) for part in x.split(sizes)])


def draw_paths(students: int, modules: int, stages: int, seed: int) -> list[list[int]]:
    """``students`` paths of one module index per stage, uniform over the ``modules ** stages``
    paths (paper 002, eq. 1) from a generator seeded by ``seed``; distinct while there are
    enough paths (two students on one path would be one student twice)."""
    g = generator("routes", seed)
    total = modules ** stages
    if students <= total <= 1 << 20:
        picks = torch.randperm(total, generator=g)[:students].tolist()
    else:
        picks = torch.randint(total, (students,), generator=g).tolist()
    return [[(n // modules ** (stages - 1 - i)) % modules for i in range(stages)] for n in picks]


def _check_paths(paths: Sequence[Sequence[int]], students: int | None, modules: int,
                 stages: int) -> list[list[int]]:
    shape = f"{stages} module indices in 0..{modules - 1} (one per stage)"
    if not paths:
        raise ArgumentError("paths", f"must be a list of paths of {shape}, got {paths!r}")
    for k, path in enumerate(paths):
        if len(path) != stages or not all(0 <= m < modules for m in path):
            raise ArgumentError("paths", f"student {k}'s path {path!r} is not {shape}")
    if students is not None and students != len(paths):
        raise ArgumentError("students", f"is {students} but paths gives {len(paths)} paths")
    return [list(p) for p in paths]


def _routed_example(backbone: str, points: Sequence[str]) -> dict[str, Any]:
    middle = len(points) // 2
    return {"split": [points[middle - 1], points[middle]], "modules": 2, "students": 3}


@register_graph("routed", example=_routed_example)
def build_routed(model: str | nn.Module,
                 split: Annotated[Points | None, Field(
                     description="split points between the stages, in execution order")] = None,
                 modules: Annotated[Count, Field(description="modules per stage")] = 2,
                 students: Annotated[Count | None, Field(
                     description="number of students (default 8, or one per path)")] = None,
                 paths: Annotated[Sequence[Sequence[Annotated[int, Field(ge=0)]]] | None, Field(
                     description="each student's path, one module index per stage (default: "
                                 "drawn from seed)")] = None,
                 seed: Annotated[int, Field(description="the seed that draws the paths")] = 0,
                 input_size: InputSize = None,
                 execution: Annotated[Literal[ROUTED_MODES], Field(
                     description="how a module several students use runs")] = "loop",
                 pretrained: Pretrained = None, copies: Copies = "pretrained",
                 model_kwargs: ModelKwargs = None) -> RoutedNet:
    """Cut ``model`` at ``split`` into stages of ``modules`` modules each and route
    ``students`` (default 8) students through them: paths drawn by :func:`draw_paths` from
    ``seed`` (the recipe's seed in training), or given as ``paths`` (one module index per
    stage; paper 002's transfer of a parameter-sharing structure, Table 7). The config stores
    the paths, so a rebuild or a resumed run has the same students. ``execution``: see
    :meth:`RoutedNet.set_execution`. ``pretrained``: initial weights of every module
    (``copies="pretrained"``) or of module 0 of each stage only (``"fresh"``), as in
    :func:`~.build.build_tree`."""
    split = _parse_split(split)
    stages_count = len(split) + 1
    if paths is None:
        paths = draw_paths(8 if students is None else students, modules, stages_count, seed)
    else:
        paths = _check_paths(paths, students, modules, stages_count)
    module, spec = backbones.resolve(model, **(model_kwargs or {}))
    size = tuple(input_size) if input_size else backbones.default_input_size(module)
    config = _config("routed", spec, size, split=split, modules=modules, students=len(paths),
                     paths=paths, seed=seed, execution=execution, copies=copies)
    keep = load_pretrained(module, spec, pretrained, size, copies, len(paths))
    reference_keys = list(module.state_dict().keys())
    if split:
        stages, names, unused = cut_stages(module, size, split)
    else:
        stages, names, unused = [module], ["input..output"], {}
    net = RoutedNet(stages, modules, paths, spec, reference_keys, config, names, unused)
    # module m of every stage from the m-th fresh instance, but for the pretrained keys kept
    reinitialise(net.stages, [list(range(modules))] * len(net.stages), module, spec, keep)
    return net.set_execution(execution).train(module.training)
