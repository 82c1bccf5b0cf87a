"""How a training graph runs the sibling copies of a branch stage.

Siblings are the ``fanout`` copies of a stage that read the same parent tensor. Modes:

- ``loop``: one copy after another (the reference).
- ``fused``: their first convolutions/Linears on the shared tensor run as one wide layer, then
  each copy runs the rest of its graph on its slice (:mod:`.fused`).
- ``packed``: the siblings run as one grouped network (:mod:`.packed`).
- ``auto``: on the first training-mode forward with gradients, every mode that can run a stage
  is timed there, on whatever device it runs on (forward + backward of that stage's first sibling
  group on the real input, wall clock: one warm-up, then the best of three, modes interleaved so
  that a busy machine slows them alike) and the fastest is kept for that stage; a mode replaces
  ``loop`` only when it is at least 3% faster. Buffers and RNG state are restored after timing,
  so the step itself is unchanged. Until the choice is made (eval, ``no_grad``) the loop runs;
  it is made again after ``.to()``/``.cuda()``/``.half()`` or ``set_execution``. The choices
  (:meth:`Executor.choices`) are what a training run checkpoints, so a resumed run replays them
  (:meth:`Executor.replay`) instead of timing again, bit-exactly; two fresh runs may choose
  differently (as with ``cudnn.benchmark``): for bit-reproducible fresh runs, name a mode.

Every mode gives the loop's logits, gradients and BatchNorm statistics (to float tolerance);
weights stay owned by the copies, so ``state_dict``, optimizers and export do not change. A plan
is checked against the loop on two samples when it is built; a stage a mode cannot run (or whose
check fails) runs as a loop, and :meth:`Executor.describe` says why.

``compile`` (True, or a dict of ``torch.compile`` arguments) wraps every plan (each sibling
group, and each single-copy stage) in ``torch.compile``: regional compilation that leaves
module names and ``state_dict`` alone.

``checkpoint_branches`` (``True`` or ``"selective"``) recomputes branch stages (stages with more
than one copy) in backward, one segment (a residual block, say) at a time (:mod:`.recompute`);
packed groups are segmented alike, fused groups recompute as the loop. ``auto`` never turns
recomputation on by itself: it trades time for memory, and auto only times.
"""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from collabsurgery.errors import ArgumentError, UserError
from collabsurgery.graphs.execution.fused import FusedStage
from collabsurgery.graphs.execution.packed import PackedStage, Unsupported
from collabsurgery.graphs.execution.recompute import (SegmentedCopy, check_recompute, checkpointed,
                                                      recompute_with)
from collabsurgery.surgery import Stage, trace
from collabsurgery.surgery.buffers import BufferSnapshot

EXECUTION_MODES = ("loop", "fused", "packed", "auto")
CANDIDATES = ("loop", "fused", "packed")
Plan = Callable[[torch.Tensor], list[torch.Tensor]]
_MIN_GAIN = 0.03  # auto keeps the loop unless another mode is this much faster
_TIMING_REPEATS = 4  # auto's timing: one warm-up, then the best of three


def check_mode(mode: str) -> str:
    """``mode`` if it is an execution mode, else a UserError naming the valid ones."""
    if mode not in EXECUTION_MODES:
        raise ArgumentError("execution", f"'{mode}' is an unknown execution mode; valid: "
                                         f"{', '.join(EXECUTION_MODES)}")
    return mode


def _loop(group: Sequence[nn.Module]) -> Plan:
    return lambda x: [stage(x) for stage in group]


def _traced(group: Sequence[nn.Module], x: torch.Tensor) -> list[nn.Module]:
    """Stages for the copies of a whole model (pattern "instances"), sharing their modules."""
    if all(isinstance(m, Stage) for m in group):
        return list(group)
    try:
        traced = trace(group[0], tuple(x.shape[1:]))
    except UserError as err:
        raise Unsupported(str(err)) from None
    return [Stage(m, copy.deepcopy(traced.train.graph), copy.deepcopy(traced.eval.graph),
                  deinplace=True) for m in group]


def _build(mode: str, group: Sequence[nn.Module], x: torch.Tensor) -> Plan:
    if mode == "loop":
        return _loop(group)
    training = group[0].training
    group = _traced(group, x)
    if mode == "fused":
        return FusedStage(group, training)
    return PackedStage(group, group[0].train_graph if training else group[0].eval_graph)


def _fork_rng(x: torch.Tensor):
    return torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])


def _validate(plan: Plan, group: Sequence[nn.Module], x: torch.Tensor) -> None:
    """Raise Unsupported unless ``plan`` gives the loop's outputs on two samples of ``x``."""
    param = next(group[0].parameters(), None)
    dtype = param.dtype if param is not None and x.is_floating_point() else x.dtype
    sample = x[:2].detach().to(dtype)
    buffers = BufferSnapshot(*group)
    try:
        with torch.no_grad(), _fork_rng(x), torch.autocast(x.device.type, enabled=False):
            torch.manual_seed(0)
            expected = _loop(group)(sample)
            buffers.restore()
            torch.manual_seed(0)
            actual = plan(sample)
    except RuntimeError as err:
        raise Unsupported(f"failed on a test batch ({str(err).splitlines()[0]}), so the loop "
                          "runs instead") from None
    finally:
        buffers.restore()
    tol = 1e-3 if dtype == torch.float32 or dtype == torch.float64 else 5e-2
    for a, e in zip(actual, expected):
        if a.shape != e.shape or a.dtype != e.dtype or not torch.allclose(
                a.float(), e.float(), rtol=tol, atol=tol * (1 + e.abs().max().item())):
            raise Unsupported("its output on a test batch differed from the loop's (the stage "
                              "draws random numbers, e.g. dropout, or has an op this mode does "
                              "not reproduce), so the loop runs instead")


def _time_plans(plans: dict[str, Plan], group: Sequence[nn.Module], x: torch.Tensor,
                repeats: int = _TIMING_REPEATS) -> dict[str, float]:
    """Forward+backward seconds of each plan on ``x``: best of ``repeats - 1`` after a warm-up."""
    params = [p for m in group for p in m.parameters() if p.requires_grad]
    samples: dict[str, list[float]] = {mode: [] for mode in plans}
    buffers = BufferSnapshot(*group)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    try:
        with _fork_rng(x):
            for _ in range(repeats):
                for mode, plan in plans.items():
                    xi = x.detach().requires_grad_(x.requires_grad)
                    sync()
                    start = time.perf_counter()
                    outs = plan(xi)
                    inputs = [xi, *params] if x.requires_grad else params
                    torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs],
                                        allow_unused=True)
                    sync()
                    samples[mode].append(time.perf_counter() - start)
    finally:
        buffers.restore()
    return {mode: min(s[1:]) if len(s) > 1 else s[0] for mode, s in samples.items()}


_plan_ids = itertools.count()


def _compiled(plan: Plan, options: dict) -> Plan:
    """``torch.compile`` of one plan, with a code object of its own.

    Dynamo caches compiled graphs per code object and caps recompilations per code object; all
    plans share a few (``PackedStage.__call__``...), so without this a tree with many sibling
    groups, or many nets in one process, would hit the cap.
    """
    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return plan(x)
    run.__code__ = run.__code__.replace(co_name=f"plan_{next(_plan_ids)}")
    return torch.compile(run, **options)


class Executor:
    """The execution mode of a staged graph's branch stages, with its built plans.

    Holds no modules: it is handed each stage's copies, and its plans reference them; plans are
    rebuilt after a deep copy, a pickle round trip or ``clear()`` (called when the graph's
    tensors move).
    """

    def __init__(self, mode: str = "auto", checkpoint_branches: bool | str = False,
                 compile: bool | dict = False):
        self.mode = check_mode(mode)
        self.checkpoint_branches = check_recompute(checkpoint_branches)
        self.compile = compile  # True, or keyword arguments of torch.compile
        self.clear()

    def clear(self) -> None:
        """Forget built plans and auto choices (weights moved, mode changed)."""
        self._plans: dict[tuple, Plan] = {}
        self.notes: dict[tuple[int, str], str] = {}
        self.chosen: dict[int, str] = {}
        self.timings: dict[int, dict[str, float]] = {}
        self.replayed: set[int] = set()
        self.used: dict[int, str] = {}

    def __getstate__(self) -> dict:
        return {"mode": self.mode, "checkpoint_branches": self.checkpoint_branches,
                "compile": self.compile}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __deepcopy__(self, memo: dict) -> "Executor":
        return Executor(**self.__getstate__())

    def run_stage(self, index: int, copies: Sequence[nn.Module], parents: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
        """Outputs of every copy of stage ``index``; copy ``c`` reads ``parents[c // fanout]``
        (the copies reading one parent are a sibling group)."""
        fanout = len(copies) // len(parents)
        ckpt = self.checkpoint_branches if len(copies) > 1 and torch.is_grad_enabled() else False
        outputs: list[torch.Tensor] = []
        for p, x in enumerate(parents):
            group = list(copies[p * fanout:(p + 1) * fanout])
            plan, mode = self._plan_for(index, p, group, x)
            if not ckpt:
                outputs.extend(plan(x))
            elif self.compile:  # a compiled plan is recomputed whole
                outputs.extend(checkpointed(plan, x, group, ckpt))
            elif mode == "packed":
                outputs.extend(plan(x, recompute=recompute_with(ckpt, group)))
            else:  # the loop (fused's wide first layer does not split into segments)
                outputs.extend(segmented(x, recompute_with(ckpt, [copy])) for copy, segmented
                               in zip(group, self._segmented(index, p, group, x)))
        return outputs

    def _segmented(self, index: int, parent: int, group: list[nn.Module], x: torch.Tensor
                   ) -> list[SegmentedCopy]:
        """The copies of ``group`` cut into recomputation segments (built once)."""
        training = group[0].training
        key = (index, parent, len(group), "segments", training)
        if key not in self._plans:
            self._plans[key] = [
                SegmentedCopy(stage, stage.train_graph if training else stage.eval_graph)
                for stage in _traced(group, x)]
        return self._plans[key]

    @torch.compiler.disable
    def _plan_for(self, index: int, parent: int, group: list[nn.Module], x: torch.Tensor
                  ) -> tuple[Plan, str]:
        mode = self.mode
        if len(group) == 1:
            mode = "loop"
        elif mode == "auto":
            mode = self.chosen.get(index)
            if mode is None and torch.is_grad_enabled() and group[0].training:
                mode = self._decide(index, group, x)
            mode = mode or "loop"
        plan = self._plan(index, parent, mode, group, x)
        if plan is None:
            mode, plan = "loop", self._plan(index, parent, "loop", group, x)
        self.used[index] = mode
        return plan, mode

    def _plan(self, index: int, parent: int, mode: str, group: list[nn.Module],
              x: torch.Tensor) -> Plan | None:
        """The cached plan, or None when ``mode`` cannot run this stage (reason in notes)."""
        training = group[0].training
        # the group is part of the key: a graph taking shared and per-head batches runs stage
        # 0 as one group of all copies or as one group per copy
        key = (index, parent, len(group), mode, training)
        if key not in self._plans:
            if (index, mode) in self.notes:
                return None
            try:
                plan = _build(mode, group, x)
                if mode != "loop":
                    _validate(plan, group, x)
            except Unsupported as err:
                self.notes[(index, mode)] = str(err)
                return None
            if self.compile:
                plan = _compiled(plan, self.compile if isinstance(self.compile, dict) else {})
            self._plans[key] = plan
        return self._plans[key]

    def _decide(self, index: int, group: list[nn.Module], x: torch.Tensor) -> str:
        plans = {m: p for m in CANDIDATES if (p := self._plan(index, 0, m, group, x)) is not None}
        times = _time_plans(plans, group, x)
        best = min(times, key=times.__getitem__)
        if times[best] > (1 - _MIN_GAIN) * times["loop"]:
            best = "loop"
        self.timings[index], self.chosen[index] = times, best
        return best

    def choices(self) -> dict[int, dict[str, Any]]:
        """What ``auto`` chose so far, by stage index: ``{"mode": ..., "ms": {mode: time}}``
        (the timings that chose it, in milliseconds)."""
        return {i: {"mode": mode, "ms": {m: round(t * 1e3, 3) for m, t in
                                         self.timings.get(i, {}).items()}}
                for i, mode in sorted(self.chosen.items())}

    def replay(self, choices: dict[int, dict[str, Any]]) -> None:
        """Run the modes of ``choices`` (from :meth:`choices`, e.g. of the run a checkpoint
        came from) instead of timing; ignored unless the mode is ``auto``."""
        if self.mode != "auto":
            return
        for index, choice in choices.items():
            if choice.get("mode") not in CANDIDATES:
                raise UserError(f"a recorded execution choice {choice!r} is not one of "
                                f"{', '.join(CANDIDATES)}")
            self.chosen[index] = choice["mode"]
            self.timings[index] = {m: t / 1e3 for m, t in choice.get("ms", {}).items()}
            self.replayed.add(index)

    def describe(self, stage_names: Sequence[str], copies: Sequence[int],
                 group_sizes: Sequence[int]) -> str:
        """One line per stage (its name, copies and sibling-group size): the requested and the
        running mode, and why."""
        lines = [f"execution: {self.mode}" +
                 {False: "", True: ", branch stages recomputed in backward segment by segment",
                  "selective": ", branch stages recomputed selectively (convolutions and "
                               "matmuls saved) segment by segment"}[self.checkpoint_branches] +
                 (", every sibling group compiled" if self.compile else "")]
        for i, (name, count, group) in enumerate(zip(stage_names, copies, group_sizes)):
            if group == 1:
                lines.append(f"  {name}: {count} cop{'y' if count == 1 else 'ies'}, loop")
                continue
            used = self.used.get(i, self.chosen.get(i))
            running = (f"running {used}" if used else
                       "no training step run by this process yet (the mode is chosen on the "
                       "first one)")
            line = f"  {name}: {count} copies in groups of {group}, {running}"
            if i in self.chosen:
                timed = ", ".join(f"{m} {t * 1e3:.1f} ms" for m, t in self.timings[i].items())
                replayed = "replays the checkpointed choice, " if i in self.replayed else ""
                line += (f" (auto {replayed}timed: {timed or 'not recorded'}; a mode beats the "
                         f"loop only when {_MIN_GAIN:.0%} faster)")
            why = [f"{m}: {r}" for (j, m), r in self.notes.items() if j == i]
            lines.append(line + ("; not used: " + "; ".join(why) if why else ""))
        return "\n".join(lines)
