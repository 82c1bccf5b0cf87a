"""Training-step and epoch time of Collaborative Group Learning (paper 002) against one model.

    python tools/bench_cgl.py                                   # cifar_resnet20, 9 stages, M=2
    python tools/bench_cgl.py --students 2,4,8 --probabilities 0.25,0.5,1.0 --image-size 32 \\
        --batch-size 32 --repeats 7 --warmup 2 --threads 1 --clock process --json

Everything is measured in ONE process, after warm-up, as the median of repeats, with every
variant interleaved in every round (the single model, then for each K the K students without
imitation, then CGL at each p), so slow drifts of a shared machine hit them alike. A step is what
the engine does: forward, loss, backward and an Adam step (``zero_grad(set_to_none=True)``).

- single: the plain model (head 0's backbone) on one batch of B, cross entropy.
- CGL (K, p): ``Collaboration(routed graph of K students, GroupImitationLoss(p))`` on a
  per-student batch ``[K, B, ...]`` (sub-set data: every student its own B examples); each
  repeat has its own seeded :class:`Step`, so the sub-groups are drawn as in training.
- independent (K): the same routed graph with plain cross entropy per student (no imitation):
  what the K students cost without the imitation forwards.

The rows of one K share one routed graph and one Adam optimizer (the parameters' values do not
change the step's cost; this keeps the memory at one graph per K).

Ratios, all against the single model's step on one batch of B:

- ``step_ratio``: CGL step / single step ("the same number of examples per student" view);
- ``per_example_ratio`` = step_ratio / K: a CGL step processes K batches of B;
- ``epoch_ratio`` = step_ratio / K. With sub-set data each of the K students sees N/K of the N
  training examples per epoch, in batches of B, so a CGL epoch has N/(K B) steps against the
  single model's N/B: epoch time ratio = (N/(K B)) t_CGL / ((N/B) t_single) = step_ratio / K.
  (Were every student to see all N examples, the epoch ratio would be the step ratio.)

Checks beside the times: ``imitated_mean``, the mean number of imitated students per step over
the timed steps (expected K (K-1) p); ``forward_equivalents``, the imitation work per step in
single-model forwards: the stages ``run_heads`` actually runs (prefixes shared with student k's
path are reused from its training forward), each weighted by its share of the model's forward
FLOPs (``forward_equivalents_expected``: its expectation over ``expectation_draws`` draws);
``imitation_ms_per_forward`` = (t_CGL - t_independent) / forward_equivalents, to compare with the
single model's no-grad (train-mode) forward time; ``step_ratio_at_expected``: the step ratio
with that imitation time scaled from the timed steps' draws to the expected ones (the work of a
CGL step varies with its draws, so the fastest repeat, ``step_ratio_min``, is mostly the step
with the fewest imitations). ``params``: parameters of the collaboration (M x the backbone's,
whatever K). ``minor_faults``: the median number of minor page faults per step (on the CPU,
memory the allocator returned to the system and faults in again: system time, which the process
clock counts).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from collabsurgery.errors import UserError
from collabsurgery.graphs import build_graph, splits
from collabsurgery.measure.bench import (_Timer, bench_device, check_timing, device_name,
                                         finite_json, minor_faults, run_tool, torch_threads)
from collabsurgery.models import backbones
from collabsurgery.objectives import GroupImitationLoss, SingleLoss
from collabsurgery.objectives.base import Step
from collabsurgery.train.engine import Collaboration


@dataclass
class CglBenchConfig:
    """What to measure (see the module docstring)."""

    model: str = "cifar_resnet20"
    split: list[str] | None = None  # None: every block boundary (block_splits)
    modules: int = 2
    students: tuple[int, ...] = (2, 4, 8)
    probabilities: tuple[float, ...] = (0.25, 0.5, 1.0)
    image_size: int = 32
    batch_size: int = 32
    num_classes: int = 100
    temperature: float = 3.0
    lr: float = 1e-3
    repeats: int = 7
    warmup: int = 2
    threads: int | None = 1
    clock: str = "process"
    device: str | None = None
    seed: int = 0
    execution: str = "loop"  # the routed graph's execution (loop or concat)
    compare_execution: bool = False  # instead: concat against loop (compare_execution)
    expectation_draws: int = 1000
    model_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        """UserError for a setting that cannot be measured."""
        check_timing(self.repeats, self.warmup, self.clock, self.batch_size, self.image_size)
        if not self.students or any(k < 2 for k in self.students):
            raise UserError("students: every K must be >= 2 (CGL imitates other students)")
        if not self.probabilities or any(not 0 < p <= 1 for p in self.probabilities):
            raise UserError("probabilities: every p must be in (0, 1]")
        if self.expectation_draws < 1:
            raise UserError("expectation draws must be >= 1")


def block_splits(model: str, input_size: Sequence[int], **model_kwargs) -> list[str]:
    """The split points at every residual-block boundary of a ResNet-style model (``layerN.i``
    and ``layerN``), without the last one (after it come only pooling and the classifier):
    stages of one block each (paper 002's modules are residual blocks)."""
    points = [p for p in splits(model, input_size=tuple(input_size), **model_kwargs)
              if re.fullmatch(r"layer\d+(\.\d+)?", p)]
    if len(points) < 2:
        raise UserError(f"{model} has no layerN.i block boundaries; give --split")
    return points[:-1]


def _stage_weights(graph, x: torch.Tensor) -> list[float]:
    """Each stage's share of the model's forward FLOPs (head 0's path, on ``x``)."""
    flops = []
    for piece in graph.cost_pieces(x):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            piece.module(piece.input)
        flops.append(counter.get_total_flops())
    total = sum(flops)
    return [f / total for f in flops] if total else [1 / len(flops)] * len(flops)


def _forward_equivalents(paths: list[tuple[int, ...]], groups: torch.Tensor,
                         weights: list[float]) -> float:
    """The imitation work of one step in single-model forwards: for every student k, the
    distinct path prefixes of its sub-group that ``run_heads(x_k, members, source=k)`` runs
    (those of k's own path are reused), each stage weighted by its FLOP share."""
    depth = len(weights)
    total = 0.0
    for k, row in enumerate(groups.tolist()):
        members = [j for j, on in enumerate(row) if on]
        known = {paths[k][:d] for d in range(1, depth)}
        runs = {paths[j][:d] for j in members for d in range(1, depth + 1)} - known
        total += sum(weights[len(prefix) - 1] for prefix in runs)
    return total




class _Variant:
    """One measured training step: a closure over its module, batch, labels and optimizer."""

    def __init__(self, name: str, step: Callable[[Step], torch.Tensor | None]):
        self.name, self.step = name, step
        self.imitated: list[torch.Tensor] = []


def run(cfg: CglBenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure ``cfg``; returns a JSON-ready dict (see the module docstring for each field)."""
    cfg.check()
    with torch_threads(cfg.threads):
        return _run(cfg, log)


def _run(cfg: CglBenchConfig, log: Callable[[str], None]) -> dict:
    device = bench_device(cfg.device)
    size = (3, cfg.image_size, cfg.image_size)
    kwargs = {"num_classes": cfg.num_classes, **cfg.model_kwargs}
    split = list(cfg.split) if cfg.split else block_splits(cfg.model, size, **kwargs)
    data = torch.Generator().manual_seed(cfg.seed)
    b, c = cfg.batch_size, cfg.num_classes

    torch.manual_seed(cfg.seed)
    graphs = {k: build_graph("routed", cfg.model, split=split, modules=cfg.modules, students=k,
                             seed=cfg.seed, input_size=size, execution=cfg.execution,
                             model_kwargs=kwargs).to(device).train()
              for k in cfg.students}
    reference = graphs[cfg.students[0]]
    plain = backbones.create(reference.head_spec(0)).to(device).train()
    weights = _stage_weights(copy.deepcopy(reference), torch.randn(2, *size, device=device))

    variants: list[_Variant] = []
    x1 = torch.randn(b, *size, generator=data).to(device)
    y1 = torch.randint(c, (b,), generator=data).to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=cfg.lr)

    def single(step: Step) -> None:
        F.cross_entropy(plain(x1), y1).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def single_forward(step: Step) -> None:
        with torch.no_grad():
            plain(x1)

    variants += [_Variant("single", single), _Variant("single_forward", single_forward)]

    def collaboration_step(collab: Collaboration, opt, x, y) -> Callable[[Step], torch.Tensor]:
        def step_fn(step: Step):
            out = collab(x, y, step)
            (out.loss * collab.graph.loss_weight).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.parts.get("imitated")
        return step_fn

    objectives: dict[tuple[int, float], GroupImitationLoss] = {}
    params: dict[int, int] = {}
    for k in cfg.students:
        graph = graphs[k]
        opt = torch.optim.Adam(graph.parameters(), lr=cfg.lr)  # one per K: shared by its rows
        xk = torch.randn(k, b, *size, generator=data).to(device)
        yk = torch.randint(c, (k, b), generator=data).to(device)
        variants.append(_Variant(f"independent{k}", collaboration_step(
            Collaboration(graph, SingleLoss()), opt, xk, yk)))
        for p in cfg.probabilities:
            objectives[k, p] = GroupImitationLoss(probability=p, temperature=cfg.temperature)
            collab = Collaboration(graph, objectives[k, p])
            params[k] = sum(t.numel() for t in collab.parameters())
            variants.append(_Variant(f"cgl{k}_{p}", collaboration_step(collab, opt, xk, yk)))

    timer = _Timer(device, cfg.clock)
    rounds = cfg.warmup + cfg.repeats
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    faults: dict[str, list[int]] = {v.name: [] for v in variants}
    timed_steps: list[Step] = []
    for r in range(rounds):
        log(f"{'warm-up' if r < cfg.warmup else 'repeat'} {r + 1}/{rounds}")
        step = Step(seed=cfg.seed, epoch=0, batch=r, epochs=1, batches=rounds)
        if r >= cfg.warmup:
            timed_steps.append(step)
        for v in variants:
            result: list = []
            before = minor_faults()
            seconds = timer(lambda: result.append(v.step(step)))
            if r >= cfg.warmup:
                times[v.name].append(seconds)
                faults[v.name].append(minor_faults() - before)
                if result[0] is not None:
                    v.imitated.append(result[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    median_faults = {name: statistics.median(f) for name, f in faults.items()}
    best = {name: min(t) for name, t in times.items()}
    by_name = {v.name: v for v in variants}

    single_s = median["single"]
    plain_params = sum(t.numel() for t in plain.parameters())
    independent, rows = [], []
    expectation_steps = [Step(seed=cfg.seed + 1, batch=i, batches=cfg.expectation_draws)
                         for i in range(cfg.expectation_draws)]
    for k in cfg.students:
        ratio = median[f"independent{k}"] / single_s
        independent.append(dict(
            students=k, step_ms=median[f"independent{k}"] * 1e3, step_ratio=ratio,
            step_ratio_min=best[f"independent{k}"] / best["single"],
            per_example_ratio=ratio / k, epoch_ratio=ratio / k, params=params[k],
            minor_faults=median_faults[f"independent{k}"]))
        paths = [tuple(p) for p in graphs[k].paths]
        for p in cfg.probabilities:
            name = f"cgl{k}_{p}"
            ratio = median[name] / single_s
            equivalents = statistics.mean(
                _forward_equivalents(paths, objectives[k, p].draw_subgroups(k, s), weights)
                for s in timed_steps)
            expected = statistics.mean(
                _forward_equivalents(paths, objectives[k, p].draw_subgroups(k, s), weights)
                for s in expectation_steps)
            extra = median[name] - median[f"independent{k}"]
            # the timed steps' draws deviate from the expectation: scale the imitation time
            at_expected = (median[f"independent{k}"] + extra * expected / equivalents) \
                / single_s if equivalents else None
            rows.append(dict(
                students=k, probability=p, step_ms=median[name] * 1e3, step_ratio=ratio,
                step_ratio_min=best[name] / best["single"], per_example_ratio=ratio / k,
                epoch_ratio=ratio / k,
                imitated_mean=statistics.mean(float(t) for t in by_name[name].imitated),
                imitated_expected=k * (k - 1) * p, forward_equivalents=equivalents,
                forward_equivalents_expected=expected, step_ratio_at_expected=at_expected,
                imitation_ms=extra * 1e3,
                imitation_ms_per_forward=extra * 1e3 / equivalents if equivalents else None,
                params=params[k], param_ratio=params[k] / plain_params,
                minor_faults=median_faults[name]))
    return dict(
        config={key: (list(v) if isinstance(v, tuple) else v) for key, v in asdict(cfg).items()},
        split=split, stages=len(split) + 1, stage_flop_shares=weights,
        device=device_name(device), torch=torch.__version__,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        clock="cuda events" if device.type == "cuda" else cfg.clock,
        single=dict(step_ms=single_s * 1e3, forward_ms=median["single_forward"] * 1e3,
                    params=plain_params, minor_faults=median_faults["single"],
                    forward_minor_faults=median_faults["single_forward"]),
        independent=independent, rows=rows,
        epoch_derivation="sub-set data: each of K students sees N/K examples per epoch in "
                         "batches of B, so an epoch has N/(K B) CGL steps against N/B single "
                         "steps: epoch ratio = step ratio / K")


def format_table(result: dict) -> str:
    """The result as a table a person can read."""
    cfg, single = result["config"], result["single"]
    lines = [f"{cfg['model']} routed: {result['stages']} stages (split "
             f"{','.join(result['split'])}) x {cfg['modules']} modules; {cfg['image_size']} px, "
             f"batch {cfg['batch_size']} per student, {cfg['num_classes']} classes, fp32, Adam",
             f"device: {result['device']}; clock: {result['clock']}; medians of "
             f"{cfg['repeats']} repeats after {cfg['warmup']} warm-up rounds, interleaved",
             f"single model: step {single['step_ms']:.1f} ms (forward + backward + Adam), "
             f"no-grad forward {single['forward_ms']:.1f} ms, {single['params']:,} parameters; "
             f"minor page faults per step {single['minor_faults']:,.0f} (forward "
             f"{single['forward_minor_faults']:,.0f})",
             "",
             f"{'K':>2} {'p':>5} {'step ms':>8} {'step':>6} {'step@E':>6} {'step/K':>6} "
             f"{'imitated':>8} {'(exp)':>6} {'fwd-eq':>6} {'(E)':>6} {'ms/fwd-eq':>9} "
             f"{'faults':>7} {'params':>9}"]
    rows = {(r["students"], r["probability"]): r for r in result["rows"]}

    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for ind in result["independent"]:
        k = ind["students"]
        lines.append(f"{k:>2} {'0':>5} {ind['step_ms']:>8.1f} {ind['step_ratio']:>6.2f} "
                     f"{'-':>6} {ind['per_example_ratio']:>6.2f} {'-':>8} {'-':>6} {'-':>6} "
                     f"{'-':>6} {'-':>9} {ind['minor_faults']:>7,.0f} {ind['params']:>9,}")
        for p in cfg["probabilities"]:
            r = rows[k, p]
            lines.append(
                f"{k:>2} {p:>5g} {r['step_ms']:>8.1f} {r['step_ratio']:>6.2f} "
                f"{num(r['step_ratio_at_expected'], '.2f'):>6} {r['per_example_ratio']:>6.2f} "
                f"{r['imitated_mean']:>8.2f} {r['imitated_expected']:>6.2f} "
                f"{r['forward_equivalents']:>6.2f} {r['forward_equivalents_expected']:>6.2f} "
                f"{num(r['imitation_ms_per_forward'], '.1f'):>9} {r['minor_faults']:>7,.0f} "
                f"{r['params']:>9,}")
    lines += ["",
              "step: median step time / the single model's step on one batch of B; p=0: the K "
              "students with cross entropy only (no imitation)",
              "step@E: the same with the imitation time scaled from the timed steps' draws to "
              "the expected ones (fwd-eq -> (E))",
              "step/K: per example (a CGL step processes K batches of B) = epoch-time ratio: "
              "with sub-set data each student",
              "  sees N/K examples per epoch, so a CGL epoch has N/(K B) steps against N/B: "
              "epoch ratio = step ratio / K",
              "imitated: mean imitated students per timed step (exp: K (K-1) p); fwd-eq: "
              "imitation work per timed step in single-",
              "  model forwards (the stages run_heads runs, prefixes shared with student k "
              "reused, FLOP-weighted; (E): expectation",
              f"  over {cfg['expectation_draws']} draws); ms/fwd-eq: (CGL - p=0) step time per "
              f"fwd-eq, against the single no-grad forward {single['forward_ms']:.1f} ms",
              "faults: median minor page faults per step (memory the allocator gave back and "
              "touches again: system time)",
              f"params: the collaboration's ({cfg['modules']} x the backbone's "
              f"{single['params']:,}, any K)"]
    return "\n".join(lines)


def _numbers(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[CglBenchConfig, bool]:
    """The configuration and whether to print JSON."""
    d = CglBenchConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--split", type=lambda s: [p for p in s.split(",") if p], default=None,
                    help="split points (default: every block boundary)")
    ap.add_argument("--modules", type=int, default=d.modules)
    ap.add_argument("--students", type=lambda s: _numbers(s, int), default=d.students)
    ap.add_argument("--probabilities", type=lambda s: _numbers(s, float),
                    default=d.probabilities)
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="per student")
    ap.add_argument("--num-classes", type=int, default=d.num_classes)
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--threads", type=int, default=d.threads, help="0: torch's default")
    ap.add_argument("--clock", choices=("wall", "process"), default=d.clock)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--execution", choices=("loop", "concat"), default=d.execution,
                    help="how a module several students use in one step runs")
    ap.add_argument("--expectation-draws", type=int, default=d.expectation_draws,
                    help="sub-group draws for the expected imitation work")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--compare-execution", action="store_true",
                    help="instead: the routed graph's forward + backward on per-student batches, "
                         "concat against loop, per K (interleaved, one process)")
    args = ap.parse_args(argv)
    cfg = CglBenchConfig(
        model=args.model, split=args.split, modules=args.modules, students=args.students,
        probabilities=args.probabilities, image_size=args.image_size,
        batch_size=args.batch_size, num_classes=args.num_classes, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads or None, clock=args.clock, device=args.device,
        seed=args.seed, execution=args.execution, expectation_draws=args.expectation_draws,
        compare_execution=args.compare_execution)
    return cfg, args.json


def compare_execution(cfg: CglBenchConfig) -> list[dict]:
    """Per K: median forward + backward time of the routed graph on per-student batches with
    ``concat`` execution over ``loop`` (the same graph, rounds interleaved, ``cfg.clock``)."""
    size = (3, cfg.image_size, cfg.image_size)
    split = cfg.split or block_splits(cfg.model, size, **cfg.model_kwargs)
    device = bench_device(cfg.device)
    cuda = device.type == "cuda"
    clock = time.process_time if cfg.clock == "process" and not cuda else time.perf_counter
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = []
    for k in cfg.students:
        graph = build_graph("routed", cfg.model, split=split, modules=cfg.modules, students=k,
                            seed=cfg.seed, input_size=size,
                            model_kwargs={"num_classes": cfg.num_classes, **cfg.model_kwargs}
                            ).to(device)
        x = torch.randn(k, cfg.batch_size, *size,
                        generator=torch.Generator().manual_seed(0)).to(device)
        times: dict[str, list[float]] = {"loop": [], "concat": []}
        for round_ in range(cfg.warmup + cfg.repeats):
            for mode in times:
                graph.set_execution(mode)
                sync()
                start = clock()
                graph(x).sum().backward()
                sync()
                if round_ >= cfg.warmup:
                    times[mode].append(clock() - start)
        loop, concat = (statistics.median(times[m]) for m in ("loop", "concat"))
        out.append(dict(students=k, loop_ms=loop * 1e3, concat_ms=concat * 1e3,
                        concat_over_loop=concat / loop))
    return out


def to_json(result: dict) -> str:
    """The result as JSON (a non-finite ratio would be invalid JSON: it is an error)."""
    return finite_json(result, result["rows"] + result["independent"], ("step_ratio",), "")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    if cfg.compare_execution:
        with torch_threads(cfg.threads):
            rows = compare_execution(cfg)
        print(json.dumps(rows, indent=1) if as_json else "\n".join(
            f"K={r['students']}: loop {r['loop_ms']:.1f} ms, concat {r['concat_ms']:.1f} ms, "
            f"concat / loop {r['concat_over_loop']:.2f}" for r in rows))
        return 0
    return run_tool(run, cfg, as_json, to_json, format_table)


if __name__ == "__main__":
    sys.exit(main())
