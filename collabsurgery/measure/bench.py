"""How close a training graph's step time comes to its limit, measured in one process.

Everything is a ratio against the plain model on the same batch, measured in the same process,
after warm-up, as the median of repeats; measurements of all variants are interleaved, so slow
drifts of a shared machine hit them alike.

- ``time_ratio``: training-graph step time / plain step time. A step is forward, the sum of the
  logits as the loss, and backward (no optimizer step). Times are CUDA events on a GPU; on the
  CPU the wall clock, or with ``clock="process"`` the process's CPU time, which a shared machine
  disturbs far less (use one thread). ``time_ratio_min`` uses each variant's fastest repeat.
- ``stage_limit_ratio``: the limit of that ratio for the graph's sharing pattern. Each of the
  graph's cost pieces (:meth:`TrainingGraph.cost_pieces`: the stages of head 0's path, or each
  student of a peer group) is timed on its own (forward + backward, input detached and requiring
  grad except the image), and weighted by the number of times the graph runs them:
  ``sum(t_i * runs_i) / sum(t_i of the pieces the plain model runs)``.
- ``flop_ratio``: FLOPs of one training step (forward + backward,
  ``torch.utils.flop_counter.FlopCounterMode``); ``forward_flop_ratio`` beside it.
- ``mem_ratio``: peak memory of a step: on CUDA ``torch.cuda.max_memory_allocated``; on the
  CPU, which keeps no allocator statistics, parameters and buffers plus the peak of the C heap
  in use after any op of the step, forward and backward, recomputation included
  (:class:`collabsurgery.measure.memory.HeapPeak`); without glibc, an estimate: parameter + gradient
  bytes + the tensors autograd saves for backward.
- ``minor_faults``: the median minor page faults of a timed step. On the CPU these are memory
  the C allocator handed back to the system and the step touches again (glibc unmaps freed
  blocks over its mmap threshold, at most 32 MB), paid as system time. They slow the plain
  model and the graph alike, so they move step times more than ratios (docs/benchmarks.md).
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from collabsurgery.errors import UserError
from collabsurgery.graphs import EXECUTION_MODES, TrainingGraph, build_graph
from collabsurgery.measure.costs import saved_tensor_bytes
from collabsurgery.measure.memory import can_measure_cpu_peak, step_peak_bytes
from collabsurgery.models import backbones
from collabsurgery.surgery.buffers import preserved_buffers

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    """What to measure; ``modes`` lists execution modes (``auto`` included by default)."""

    model: str | list[str]
    pattern: str = "tree"
    graph_args: dict = field(default_factory=dict)  # the pattern's builder arguments
    image_size: int = 224
    batch_size: int = 16
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    modes: tuple[str, ...] = EXECUTION_MODES
    checkpoint: bool = False
    repeats: int = 5
    warmup: int = 2
    num_classes: int | None = None
    device: str | None = None
    threads: int | None = None
    clock: str = "wall"
    model_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        """UserError for a setting that cannot be measured."""
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}'; valid: {', '.join(PRECISIONS)}")
        for mode in self.modes:
            if mode not in EXECUTION_MODES:
                raise UserError(f"unknown execution mode '{mode}'; valid: "
                                f"{', '.join(EXECUTION_MODES)}")
        check_timing(self.repeats, self.warmup, self.clock, self.batch_size, self.image_size)


def check_timing(repeats: int, warmup: int, clock: str, batch_size: int, image_size: int
                 ) -> None:
    """UserError for timing settings no benchmark can measure with (shared by the tools)."""
    if repeats < 1 or warmup < 1:
        raise UserError("repeats and warmup must be >= 1 (auto chooses during warm-up)")
    if clock not in ("wall", "process"):
        raise UserError(f"unknown clock '{clock}'; valid: wall, process")
    if batch_size < 2 or image_size < 8:
        raise UserError("batch size must be >= 2 (train-mode BatchNorm) and image size >= 8")


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing): on the CPU,
    memory the allocator gave back to the system and touches again, whose time counts as
    system time (which the process clock includes)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def device_name(device: torch.device) -> str:
    """The device in words: GPU name, or CPU model, thread count and the C allocator's settings
    from the environment, plus the torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"CPU {model}, {torch.get_num_threads()} threads"
        tuned = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                         if k.startswith("MALLOC_") or k == "LD_PRELOAD")
        if tuned:  # the allocator's settings move CPU times (see minor_faults)
            name += f", allocator {tuned}"
    return f"{name}, torch {torch.__version__}"


class _Timer:
    """Seconds of one call: CUDA events on a GPU; on the CPU ``perf_counter`` (wall clock) or,
    with ``clock="process"``, ``process_time`` (CPU time of this process, which ignores the time
    a shared machine keeps it waiting)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if clock == "process" else time.perf_counter

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = self.clock()
        fn()
        return self.clock() - begin


def time_interleaved(steps: dict[str, Callable[[], None]], timer: _Timer, warmup: int,
                     repeats: int, log: Callable[[str], None]
                     ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Run every step once per round (``warmup`` untimed rounds, then ``repeats`` timed), so a
    shared machine's drifts hit all alike. Returns per step name the median seconds, the
    fastest seconds and the median :func:`minor_faults` of the timed rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        log(f"{'warm-up' if r < warmup else 'repeat'} {r + 1}/{warmup + repeats}")
        for name, step in steps.items():
            before = minor_faults()
            seconds = timer(step)
            if r >= warmup:
                times[name].append(seconds)
                faults[name].append(minor_faults() - before)
    return ({name: statistics.median(t) for name, t in times.items()},
            {name: min(t) for name, t in times.items()},
            {name: statistics.median(f) for name, f in faults.items()})


class _Runner:
    """Forward + backward of one model under the configured precision."""

    def __init__(self, model: nn.Module, x: torch.Tensor, cfg: BenchConfig):
        self.model, self.x = model, x
        self.dtype = PRECISIONS[cfg.precision]

    def autocast(self):
        return torch.autocast(self.x.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self) -> None:
        with self.autocast():
            out = self.model(self.x)
        out.float().sum().backward()
        for p in self.model.parameters():
            p.grad = None


class _StageRunner(_Runner):
    """Forward + backward of one stage of the plain model, on its recorded input."""

    def __init__(self, stage: nn.Module, x: torch.Tensor, cfg: BenchConfig, needs_grad: bool):
        super().__init__(stage, x, cfg)
        self.needs_grad = needs_grad

    def step(self) -> None:
        x = self.x.detach().requires_grad_(self.needs_grad)
        with self.autocast():
            out = self.model(x)
        out.backward(torch.ones_like(out))
        for p in self.model.parameters():
            p.grad = None


def _saved_bytes(runner: _Runner) -> int:
    """Parameter + gradient + saved-activation bytes of one step (the CPU peak estimate)."""
    params = list(runner.model.parameters())
    with saved_tensor_bytes(runner.model) as seen:
        runner.step()
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights + grads + sum(seen.values())


def peak_bytes(runner: _Runner) -> int:
    """Peak memory of one step (:func:`collabsurgery.measure.memory.step_peak_bytes`), or without a
    way to measure it on the CPU (no glibc) :func:`_saved_bytes`."""
    if runner.x.device.type == "cpu" and not can_measure_cpu_peak():
        return _saved_bytes(runner)
    return step_peak_bytes(runner.model, runner.step)


def memory_method(device: torch.device) -> str:
    """How :func:`peak_bytes` measures on ``device``, in words."""
    if device.type == "cuda":
        return "cuda max_memory_allocated"
    if can_measure_cpu_peak():
        return "params + peak of the C heap in use during the step (mallinfo2)"
    return "estimate: params + grads + tensors saved for backward"


def _flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one fp32 training step on ``x``."""
    try:
        with preserved_buffers(model):
            with FlopCounterMode(display=False) as forward:
                out = model(x)
            with FlopCounterMode(display=False) as backward:
                out.float().sum().backward()
    finally:
        for p in model.parameters():
            p.grad = None
    total = forward.get_total_flops()
    return total, total + backward.get_total_flops()


# checkpoint_branches settings measured by --checkpoint, and their row names' suffixes
RECOMPUTE_SUFFIX: dict[bool | str, str] = {False: "", True: "+ckpt", "selective": "+sel"}


def _recompute_of(row: str) -> bool | str:
    """The checkpoint_branches setting of a row name (``packed+sel`` -> "selective")."""
    suffix = "+" + row.partition("+")[2] if "+" in row else ""
    return next(k for k, v in RECOMPUTE_SUFFIX.items() if v == suffix)


def _limit(times: list[float], pieces: list) -> float:
    """The stage-time limit: every piece's time times its copies, over the plain model's pieces."""
    return sum(t * p.executions for t, p in zip(times, pieces)) / \
        sum(t for t, p in zip(times, pieces) if p.in_plain)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Within the block torch uses ``threads`` intra-op threads (None or 0: unchanged)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_device(name: str | None) -> torch.device:
    """The device to measure on (default: CUDA when there is one), cuDNN autotuning on CUDA."""
    valid = "valid: cpu" + (f", cuda or cuda:0..{torch.cuda.device_count() - 1}"
                            if torch.cuda.is_available() else " (no CUDA GPU is visible here)")
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; {valid}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and (
            not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count())):
        raise UserError(f"--device '{name}' is not available; {valid}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure ``cfg``; returns a JSON-ready dict (see the module docstring for each field)."""
    cfg.check()
    with torch_threads(cfg.threads):
        return _run(cfg, log)


def _run(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    device = bench_device(cfg.device)
    kwargs = dict(cfg.model_kwargs)
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    size = (3, cfg.image_size, cfg.image_size)
    torch.manual_seed(0)
    net = build_graph(cfg.pattern, cfg.model, input_size=size, model_kwargs=kwargs,
                      **cfg.graph_args).set_execution("loop")
    plain = backbones.create(net.head_spec(0))
    modes = [m for m in cfg.modes if m in net.execution_modes or m == "auto"]
    fmt = torch.channels_last if cfg.channels_last else torch.preserve_format
    plain = plain.to(device, memory_format=fmt).train()
    net = net.to(device, memory_format=fmt).train()
    x = torch.randn(cfg.batch_size, *size, device=device).contiguous(memory_format=fmt)

    log("counting FLOPs")
    probe = x[:2].clone()
    plain_flops, net_flops = _flops(plain, probe), _flops(net, probe)

    variants: dict[str, TrainingGraph] = {}
    for mode in modes:
        for ckpt in (tuple(RECOMPUTE_SUFFIX) if cfg.checkpoint else (False,)):
            variants[mode + RECOMPUTE_SUFFIX[ckpt]] = copy.deepcopy(net).set_execution(
                mode, checkpoint_branches=ckpt, compile=cfg.compile)
    if cfg.compile:
        plain.compile()
    runners: dict[str, _Runner] = {"plain": _Runner(plain, x, cfg)}
    runners.update({name: _Runner(v, x, cfg) for name, v in variants.items()})
    reference = copy.deepcopy(net)  # its pieces: head 0's path cut in pieces (or each student)
    with runners["plain"].autocast():
        pieces = reference.cost_pieces(x)
    for i, piece in enumerate(pieces):
        if cfg.compile:
            piece.module.compile()
        runners[f"stage{i}"] = _StageRunner(piece.module, piece.input, cfg,
                                            needs_grad=piece.input is not x)

    median, best, median_faults = time_interleaved(
        {name: runner.step for name, runner in runners.items()}, _Timer(device, cfg.clock),
        cfg.warmup, cfg.repeats, log)

    log("measuring memory")
    mem = {name: peak_bytes(runners[name]) for name in ["plain", *variants]}
    stage_times = [median[f"stage{i}"] for i in range(len(pieces))]
    copies = [p.executions for p in pieces]
    limit = _limit(stage_times, pieces)
    limit_min = _limit([best[f"stage{i}"] for i in range(len(pieces))], pieces)
    common = dict(stage_limit_ratio=limit, stage_limit_ratio_min=limit_min,
                  flop_ratio=net_flops[1] / plain_flops[1],
                  forward_flop_ratio=net_flops[0] / plain_flops[0], device=device_name(device))
    entries = []
    for name, variant in variants.items():
        entries.append(dict(
            mode=name.split("+")[0], checkpoint=_recompute_of(name),
            time_ratio=median[name] / median["plain"],
            time_ratio_min=best[name] / best["plain"], mem_ratio=mem[name] / mem["plain"],
            step_ms=median[name] * 1e3, mem_mb=mem[name] / 1e6,
            minor_faults=median_faults[name], **common,
            notes=variant.describe_execution()))
    return dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        torch=torch.__version__, clock="cuda events" if device.type == "cuda" else cfg.clock,
        mem_method=memory_method(device),
        plain=dict(step_ms=median["plain"] * 1e3, mem_mb=mem["plain"] / 1e6,
                   minor_faults=median_faults["plain"], flops=plain_flops[1],
                   stage_ms=[t * 1e3 for t in stage_times],
                   stage_names=[p.name for p in pieces], stage_copies=copies,
                   stage_sum_ratio=sum(t for t, p in zip(stage_times, pieces) if p.in_plain)
                   / median["plain"]),
        modes=entries, **common)


def format_table(result: dict) -> str:
    """The result as a table a person can read."""
    cfg, plain = result["config"], result["plain"]
    on_cpu = result["clock"] != "cuda events"

    def faults(row: dict) -> str:
        return f", {row['minor_faults']:,.0f} page faults" if on_cpu else ""

    graph = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in cfg["graph_args"].items())
    model = ",".join(cfg["model"]) if isinstance(cfg["model"], list) else cfg["model"]
    lines = [f"{model} {cfg['pattern']} {graph} "
             f"{cfg['image_size']}px batch {cfg['batch_size']} {cfg['precision']}"
             f"{' channels_last' if cfg['channels_last'] else ''}"
             f"{' compiled' if cfg['compile'] else ''}", f"device: {result['device']}",
             f"plain step {plain['step_ms']:.1f} ms{faults(plain)}; stages " + ", ".join(
                 f"{n} {t:.1f} ms x{c}" for n, t, c in zip(plain["stage_names"], plain["stage_ms"],
                                                          plain["stage_copies"])),
             "", f"{'mode':<14} {'step ms':>9} {'time':>6} {'limit':>6} {'FLOPs':>6} {'mem':>6}"
             f" {'time/limit (min)':>17}" + (f" {'faults':>9}" if on_cpu else "")]
    for e in result["modes"]:
        name = e["mode"] + RECOMPUTE_SUFFIX[e["checkpoint"]]
        lines.append(f"{name:<14} {e['step_ms']:>9.1f} {e['time_ratio']:>6.2f} "
                     f"{e['stage_limit_ratio']:>6.2f} {e['flop_ratio']:>6.2f} "
                     f"{e['mem_ratio']:>6.2f} {e['time_ratio_min']:>8.2f}/"
                     f"{e['stage_limit_ratio_min']:.2f}"
                     + (f" {e['minor_faults']:>9,.0f}" if on_cpu else ""))
    lines += ["", "ratios are against the plain model, medians (min: fastest repeats); limit = "
              f"stage-time limit; clock: {result['clock']}; mem: {result['mem_method']}"]
    if on_cpu:
        lines += ["page faults: median minor page faults of a step (memory the C allocator gave "
                  "back to the system and touches again; see docs/benchmarks.md on "
                  "MALLOC_MMAP_MAX_)"]
    for e in result["modes"]:
        if e["mode"] == "auto" and not e["checkpoint"]:
            lines += ["", e["notes"]]
    return "\n".join(lines)


def finite_json(result: dict, rows: list[dict], keys: Sequence[str], label: str) -> str:
    """``result`` as JSON, after checking ``keys`` of every row are finite (a non-finite
    number would be invalid JSON: it is an error naming the row by its ``label`` key)."""
    for row in rows:
        for key in keys:
            if not math.isfinite(row[key]):
                raise ValueError(f"{key} of {row.get(label, row)} is not finite")
    return json.dumps(result, indent=2)


def run_tool(run: Callable[..., dict], cfg: Any, as_json: bool, to_json: Callable[[dict], str],
             format_table: Callable[[dict], str]) -> int:
    """A benchmark tool's main: run ``cfg`` (progress on stderr), print JSON or a table; 2 and
    one line on stderr for a setting that cannot be measured."""
    try:
        result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_json(result) if as_json else format_table(result))
    return 0


def to_json(result: dict) -> str:
    """The result as JSON (non-finite numbers would be invalid JSON: they are an error)."""
    return finite_json(result, result["modes"],
                       ("time_ratio", "stage_limit_ratio", "flop_ratio", "mem_ratio"), "mode")
