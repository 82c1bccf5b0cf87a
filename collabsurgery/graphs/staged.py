"""Stages x copies: the bookkeeping shared by graphs cut from one backbone (tree, routed, dropout).

A staged graph holds the backbone cut into stages; stage ``i`` exists in ``copies(i)`` copies
(``stages[i][c]``), and head ``h`` runs copy ``head_path(h)[i]`` of every stage ``i``. How copies
connect (a tree's fan-outs, a routed graph's random paths) is the subclass's business:
it implements :attr:`num_heads`, :meth:`head_path` and :meth:`forward_stages`; everything that
only needs paths - a head's state_dict, features at the split points, the sharing table, cost
pieces, execution modes - lives here.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from collabsurgery.errors import UserError
from collabsurgery.graphs.base import INPUT, CostPiece, GraphConfig, GraphOutput, TrainingGraph
from collabsurgery.graphs.execution.executor import EXECUTION_MODES, Executor
from collabsurgery.models.backbones import BackboneSpec


class StagedGraph(TrainingGraph):
    """A backbone cut into stages, each in one or more copies (``stages[i][c]``).

    Args:
        stages: for every stage, its copies (copy 0 first).
        stage_names: ``"a..b"`` per stage; split point ``b`` names the output of stage ``i``.
        spec: the unmodified backbone every head exports as.
        reference_keys: that backbone's ``state_dict`` keys, in order.
        config: the graph config that rebuilds this graph.
        unused_state: plain state_dict entries no stage runs (kept so exports stay complete).
    """

    execution_modes = EXECUTION_MODES

    def __init__(self, stages: Sequence[Sequence[nn.Module]], stage_names: Sequence[str],
                 spec: BackboneSpec, reference_keys: Sequence[str], config: GraphConfig,
                 unused_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec = spec
        self.config = config
        self.reference_keys = list(reference_keys)
        self.stage_names = list(stage_names)
        self.unused = nn.Module()
        self.unused_keys = {}
        for i, (key, value) in enumerate((unused_state or {}).items()):
            self.unused.register_buffer(f"t{i}", value.detach().clone())
            self.unused_keys[key] = f"t{i}"
        self.executor = Executor()
        self.stages = nn.ModuleList(nn.ModuleList(copies) for copies in stages)

    # ---------------------------------------------------------------- what subclasses define

    def head_path(self, head: int) -> list[int]:
        """The copy index of every stage that head ``head`` runs through."""
        raise NotImplementedError

    def forward_stages(self, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Outputs of every copy of every stage (the last are the logits); ``inputs`` is
        ``[x]`` for a shared batch or one tensor per head."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the contract

    def copies(self, stage: int) -> int:
        """How many copies of stage ``stage`` the graph holds."""
        return len(self.stages[stage])

    @property
    def feature_names(self) -> list[str]:
        """Named features :meth:`run` can return: the split points (each stage's output)."""
        return [name.split("..")[1] for name in self.stage_names[:-1]]

    def run(self, x: torch.Tensor, wants: Sequence[str] = ()) -> GraphOutput:
        """Logits ``[H, B, C]`` and the requested split-point features, ``[H, B, ...]`` each."""
        per_head, x = self.split_input(x)
        self.check_wants(wants, self.feature_names)
        outputs = self.forward_stages(list(x) if per_head else [x])
        paths = [self.head_path(h) for h in range(self.num_heads)]
        logits = torch.stack([outputs[-1][p[-1]] for p in paths])
        features = {}
        for name in wants:
            if name == INPUT:
                features[name] = x if per_head else x.expand(self.num_heads, *x.shape)
            else:
                i = self.feature_names.index(name)
                features[name] = torch.stack([outputs[i][p[i]] for p in paths])
        return GraphOutput(logits, features)

    def head_spec(self, head: int) -> BackboneSpec:
        """Every head of a staged graph is the same backbone."""
        self.check_head(head)
        return self.spec

    def head_state_dict(self, head: int) -> dict[str, torch.Tensor]:
        """Head ``head`` as the plain model's state_dict: exactly its keys, in its order."""
        merged: dict[str, torch.Tensor] = {}
        for stage, index in zip(self.stages, self.head_path(self.check_head(head))):
            merged.update(stage[index].state_dict())
        merged.update({key: getattr(self.unused, name) for key, name in self.unused_keys.items()})
        missing = [k for k in self.reference_keys if k not in merged]
        if missing:
            raise KeyError(f"the training graph lacks {len(missing)} keys of the plain model, "
                           f"e.g. {missing[:3]}")
        return {k: merged[k] for k in self.reference_keys}

    def describe_heads(self) -> list[list[list[int]]]:
        """For each stage, which heads share each of its copies."""
        table = []
        for i in range(len(self.stages)):
            per_copy: list[list[int]] = [[] for _ in range(self.copies(i))]
            for h in range(self.num_heads):
                per_copy[self.head_path(h)[i]].append(h)
            table.append(per_copy)
        return table

    def describe_structure(self) -> list[str]:
        """One line per stage: copies, which heads share each copy, and the modules it runs."""
        lines = [f"{'stage':<24} {'copies':>6}  {'heads per copy':<28} modules"]
        for i, (name, heads) in enumerate(zip(self.stage_names, self.describe_heads())):
            sharing = " ".join("{" + ",".join(map(str, hs)) + "}" for hs in heads)
            lines.append(f"{name:<24} {self.copies(i):>6}  {sharing:<28} "
                         f"{' '.join(self._stage_modules(i))}")
        return lines

    def _stage_modules(self, stage: int) -> list[str]:
        """Readable module names a stage runs: top-level names unless a split cuts through one."""
        def leaves(i: int) -> list[str]:
            graph = getattr(self.stages[i][0], "graph", None)
            return [] if graph is None else \
                [n.target for n in graph.nodes if n.op == "call_module"]

        if not hasattr(self.stages[stage][0], "graph"):  # a whole plain model
            return ["(whole model)"]
        others = {t for i in range(len(self.stages)) if i != stage for t in leaves(i)}
        names: list[str] = []
        for target in leaves(stage):
            top = target.split(".")[0]
            name = top if not any(o.split(".")[0] == top for o in others) else \
                ".".join(target.split(".")[:2])
            if name not in names:
                names.append(name)
        return names

    @torch.no_grad()
    def cost_pieces(self, x: torch.Tensor) -> list[CostPiece]:
        """Every stage (its copy 0, on head 0's input to it), weighted by its copies."""
        pieces, current = [], x
        for name, copies in zip(self.stage_names, self.stages):
            pieces.append(CostPiece(name, copies[0], current, len(copies)))
            current = copies[0](current)
        return pieces

    # ---------------------------------------------------------------- execution modes

    def set_execution(self, mode: str | None = None, checkpoint_branches: bool | str | None = None,
                      compile: bool | dict | None = None) -> "StagedGraph":
        """Choose how sibling copies run (``loop``, ``fused``, ``packed``, ``auto``), whether
        branch stages are recomputed in backward and whether each stage's plan is compiled;
        ``None`` keeps a setting. See :mod:`collabsurgery.graphs.execution.executor`."""
        old = self.executor
        self.executor = Executor(
            old.mode if mode is None else mode,
            old.checkpoint_branches if checkpoint_branches is None else checkpoint_branches,
            old.compile if compile is None else compile)
        return self

    def describe_execution(self) -> str:
        """Which mode runs each stage, what auto measured, and why a mode could not run."""
        groups = [len(c) // max(1, len(self._parents_of(i))) for i, c in enumerate(self.stages)]
        return self.executor.describe(self.stage_names,
                                      [len(c) for c in self.stages], groups)

    def execution_choices(self) -> dict[str, dict[str, Any]]:
        """What ``auto`` chose so far, by stage name: the mode and the timings (ms) behind it."""
        return {self.stage_names[i]: c for i, c in self.executor.choices().items()}

    def replay_execution_choices(self, choices: dict[str, dict[str, Any]]) -> None:
        """Make ``auto`` run the recorded ``choices`` instead of timing (a resumed run)."""
        unknown = [name for name in choices if name not in self.stage_names]
        if unknown:
            raise UserError(f"the recorded execution choices name stage '{unknown[0]}', which "
                            f"this graph lacks; its stages: {', '.join(self.stage_names)}")
        self.executor.replay({self.stage_names.index(n): c for n, c in choices.items()})

    def _parents_of(self, stage: int) -> list[int]:
        """The distinct parent copies feeding stage ``stage`` (one for the first stage)."""
        if stage == 0:
            return [0]
        return sorted({self.head_path(h)[stage - 1] for h in range(self.num_heads)})

    @contextmanager
    def reference_execution(self) -> Iterator[None]:
        """Run as a plain loop of copies inside the block; the chosen mode and its plans return
        afterwards untouched."""
        executor, self.executor = self.executor, Executor("loop")
        try:
            yield
        finally:
            self.executor = executor

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if "executor" in self.__dict__:  # tensors moved: plans and timings are stale
            self.executor.clear()
        return module
