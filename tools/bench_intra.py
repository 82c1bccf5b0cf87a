"""Training memory and step time: dropout views (paper 004) vs the plain model vs a tree.

Hierarchical dropout views of one weight set (paper 004) against the plain model and against a
tree of stage copies (paper 000) with as many heads.

    python tools/bench_intra.py                       # cifar_resnet20, 32 px, K=2 at its last point
    python tools/bench_intra.py --model torchvision.resnet50 --image-size 224 --batch-size 8 \\
        --num-classes 1000 --samples 2 --dropout-split layer4,avgpool --tree-split layer2,layer3 \\
        --repeats 3 --warmup 1 --threads 1 --clock process

Everything is measured in ONE process, after warm-up, as the median of repeats, with every
variant interleaved in every round (plain, dropout views, tree, tree at the dropout points), so
slow drifts of a shared machine hit them alike. A step is forward, the loss, backward (no
optimizer step); the loss is the sum of the logits times the graph's ``loss_weight`` (1/K^n for
the dropout views, 1 for the plain model and for a tree with backprop rescaling).

Variants (all built from one backbone spec, fp32, train mode):

- ``plain``: the unmodified backbone (head 0's spec), logits ``[B, C]``.
- ``dropout``: ``pattern="dropout"``: ONE weight set; at each of its n points (``--dropout-split``;
  default: the model's own dropout modules at clean cuts, else its last split point) the
  activation is sampled K (``--samples``) times with independent masks: K^n views.
- ``tree``: ``pattern="tree"`` with K^n heads at ``--tree-split`` (default: the n split points in
  the middle of the model): stage copies after each point, branches K at each point when there
  are n points, else :func:`~collabsurgery.graphs.even_branches`.
- ``tree_same``: a tree with K^n heads and branches K at each of the dropout graph's own points
  (what the views would cost as copies); skipped, with the reason, when it does not build or
  its points are those of ``tree``.

Reported per variant: ``time_ratio`` (median step time / the plain model's; ``time_ratio_min``
of the fastest repeats), ``flop_ratio`` (forward + backward FLOPs on two images,
``FlopCounterMode``), ``mem_mb`` / ``mem_ratio`` (peak training memory of one step) and
``dropout_mem_over`` (the dropout views' memory over this variant's), ``params``,
``minor_faults`` (median minor page faults per timed step: on the CPU, memory glibc's allocator
gave back to the system and faults in again, whose system time the process clock counts).

Peak memory: on CUDA the step's ``max_memory_allocated`` above what was allocated before it
(every variant's weights stay resident while the others run), plus this variant's parameter bytes
and the input batch: the peak of the variant alone. On the CPU, which keeps no allocator
statistics, what ``collabsurgery bench`` measures: parameters and buffers plus the peak of the C
heap in use after every op of the step (:class:`collabsurgery.measure.memory.HeapPeak`), or without
glibc an estimate (parameter + gradient bytes + the tensors autograd saves for backward).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from collabsurgery.errors import UserError
from collabsurgery.graphs import EXECUTION_MODES, build_graph, even_branches, splits
from collabsurgery.measure.bench import (_flops, _Runner, _Timer, bench_device, check_timing,
                                         device_name, finite_json, memory_method, peak_bytes,
                                         run_tool, time_interleaved, torch_threads)
from collabsurgery.models import backbones

VARIANTS = ("plain", "dropout", "tree", "tree_same")


@dataclass
class IntraBenchConfig:
    """What to measure (see the module docstring)."""

    model: str = "cifar_resnet20"
    image_size: int = 32
    batch_size: int = 16
    num_classes: int | None = None  # None: the model's default
    samples: int = 2
    dropout_split: list[str] | None = None  # None: the dropout graph's default points
    dropout_p: float = 0.5
    tree_split: list[str] | None = None  # None: the n middle split points
    tree_execution: str = "loop"
    same_points: bool = True  # also the tree at the dropout graph's points
    repeats: int = 5
    warmup: int = 2
    threads: int | None = 1
    clock: str = "process"
    device: str | None = None
    seed: int = 0
    model_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        """UserError for a setting that cannot be measured."""
        check_timing(self.repeats, self.warmup, self.clock, self.batch_size, self.image_size)
        if self.samples < 2:
            raise UserError(f"samples must be >= 2 (K samples per dropout point), got "
                            f"{self.samples}")
        if not 0 <= self.dropout_p < 1:
            raise UserError(f"dropout p must be in [0, 1), got {self.dropout_p}")
        if self.tree_execution not in EXECUTION_MODES:
            raise UserError(f"unknown tree execution '{self.tree_execution}'; valid: "
                            f"{', '.join(EXECUTION_MODES)}")
        if self.num_classes is not None and self.num_classes < 1:
            raise UserError(f"num classes must be >= 1, got {self.num_classes}")


def middle_points(points: Sequence[str], n: int) -> list[str]:
    """``n`` consecutive split points from the middle of ``points`` (for 2 points the ones at
    ``len // 2 - 1`` and ``len // 2``, as the tree graph's example takes)."""
    if not 1 <= n <= len(points):
        raise UserError(f"cannot choose {n} tree split point(s) from {len(points)}; give "
                        "--tree-split")
    start = min(max(0, len(points) // 2 - n // 2), len(points) - n)
    return list(points[start:start + n])


def tree_branches(heads: int, points: int, samples: int, views_points: int) -> tuple[int, ...]:
    """The tree's fan-outs: ``samples`` at each point when it has as many points as the dropout
    graph (the views' own hierarchy), else ``heads`` spread evenly over ``points``."""
    if points == views_points:
        return (samples,) * points
    return even_branches(heads, points)


class _WeightedRunner(_Runner):
    """One training step: forward, sum of the logits x ``weight`` as the loss, backward."""

    def __init__(self, model: nn.Module, x: torch.Tensor, weight: float):
        self.model, self.x, self.dtype, self.weight = model, x, None, weight

    def step(self) -> None:
        out = self.model(self.x)
        (out.float().sum() * self.weight).backward()
        for p in self.model.parameters():
            p.grad = None


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peak_bytes(runner: _WeightedRunner) -> int:
    """Peak memory of one step of ``runner``'s model alone (see the module docstring)."""
    if runner.x.device.type != "cuda":
        return peak_bytes(runner)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    return extra + _param_bytes(runner.model) + runner.x.numel() * runner.x.element_size()


@dataclass
class _Variant:
    name: str
    model: nn.Module
    heads: int
    split: list[str]
    branches: list[int] | None
    weight: float


def run(cfg: IntraBenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure ``cfg``; returns a JSON-ready dict (see the module docstring for each field)."""
    cfg.check()
    with torch_threads(cfg.threads):
        return _run(cfg, log)


def _build(cfg: IntraBenchConfig, size: tuple[int, ...], kwargs: dict
           ) -> tuple[list[_Variant], list[dict]]:
    """The variants, and the skipped ones with their reasons."""
    torch.manual_seed(cfg.seed)
    views = build_graph("dropout", cfg.model, split=cfg.dropout_split, samples=cfg.samples,
                        p=cfg.dropout_p, input_size=size, model_kwargs=kwargs)
    points = list(views.config.args["split"])
    heads = views.num_heads
    plain = backbones.create(views.head_spec(0))
    tree_split = list(cfg.tree_split) if cfg.tree_split else middle_points(
        splits(cfg.model, input_size=size, **kwargs), len(points))
    branches = tree_branches(heads, len(tree_split), cfg.samples, len(points))
    tree = build_graph("tree", cfg.model, split=tree_split, heads=heads, branches=branches,
                       input_size=size, execution=cfg.tree_execution, model_kwargs=kwargs)
    variants = [
        _Variant("plain", plain, 1, [], None, 1.0),
        _Variant("dropout", views, heads, points, [cfg.samples] * len(points), views.loss_weight),
        _Variant("tree", tree, heads, tree_split, list(branches), tree.loss_weight)]
    skipped = []
    if not cfg.same_points:
        skipped.append(dict(name="tree_same", reason="not asked for (--no-same-points)"))
    elif points == tree_split:
        skipped.append(dict(name="tree_same", reason=f"the tree's points are the dropout "
                                                     f"points ({','.join(points)})"))
    else:
        same = (cfg.samples,) * len(points)
        try:
            net = build_graph("tree", cfg.model, split=points, heads=heads, branches=same,
                              input_size=size, execution=cfg.tree_execution, model_kwargs=kwargs)
        except UserError as err:
            skipped.append(dict(name="tree_same", reason=f"does not build: {err}"))
        else:
            variants.append(_Variant("tree_same", net, heads, points, list(same),
                                     net.loss_weight))
    return variants, skipped


def _run(cfg: IntraBenchConfig, log: Callable[[str], None]) -> dict:
    device = bench_device(cfg.device)
    size = (3, cfg.image_size, cfg.image_size)
    kwargs = dict(cfg.model_kwargs)
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    variants, skipped = _build(cfg, size, kwargs)
    for s in skipped:
        log(f"skipped {s['name']}: {s['reason']}")
    for v in variants:
        v.model.to(device).train()
    x = torch.randn(cfg.batch_size, *size, generator=torch.Generator().manual_seed(cfg.seed)
                    ).to(device)

    log("counting FLOPs")
    probe = x[:2].clone()
    flops = {v.name: _flops(v.model, probe)[1] for v in variants}

    runners = {v.name: _WeightedRunner(v.model, x, v.weight) for v in variants}
    median, best, median_faults = time_interleaved(
        {name: runner.step for name, runner in runners.items()}, _Timer(device, cfg.clock),
        cfg.warmup, cfg.repeats, log)

    log("measuring memory")
    mem = {name: _peak_bytes(runner) for name, runner in runners.items()}
    rows = []
    for v in variants:
        rows.append(dict(
            name=v.name, heads=v.heads, split=v.split, branches=v.branches, loss_weight=v.weight,
            params=sum(p.numel() for p in v.model.parameters()),
            step_ms=median[v.name] * 1e3, time_ratio=median[v.name] / median["plain"],
            time_ratio_min=best[v.name] / best["plain"], flops=flops[v.name],
            flop_ratio=flops[v.name] / flops["plain"], minor_faults=median_faults[v.name],
            mem_mb=mem[v.name] / 1e6,
            mem_ratio=mem[v.name] / mem["plain"], dropout_mem_over=mem["dropout"] / mem[v.name]))
    cuda = device.type == "cuda"
    return dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        device=device_name(device), torch=torch.__version__,
        threads=None if cuda else torch.get_num_threads(),
        clock="cuda events" if cuda else cfg.clock,
        mem_method="cuda max_memory_allocated of the step above what was allocated before it, "
                   "+ the variant's parameters and the input" if cuda else memory_method(device),
        loss="sum of the logits x the graph's loss_weight",
        views=rows[1]["heads"], dropout_points=rows[1]["split"], variants=rows,
        skipped=skipped)


def format_table(result: dict) -> str:
    """The result as a table a person can read."""
    cfg = result["config"]
    views = next(r for r in result["variants"] if r["name"] == "dropout")
    classes = f", {cfg['num_classes']} classes" if cfg["num_classes"] is not None else ""
    where = {r["name"]: (",".join(r["split"]) or "-") + (
        f" ({'x'.join(map(str, r['branches']))})" if r["branches"] else "")
        for r in result["variants"]}
    width = max(6, *map(len, where.values()))
    lines = [f"{cfg['model']} {cfg['image_size']} px, batch {cfg['batch_size']}{classes}, fp32; "
             f"dropout views: K={cfg['samples']} at {','.join(views['split'])} -> "
             f"{views['heads']} views",
             f"device: {result['device']}; threads: {result['threads'] or '-'}; clock: "
             f"{result['clock']}; medians of {cfg['repeats']} repeats after {cfg['warmup']} "
             "warm-up round(s), interleaved",
             "",
             f"{'variant':<10} {'points':<{width}} {'heads':>5} {'params M':>9} {'step ms':>9} "
             f"{'time':>6} {'(min)':>6} {'FLOPs':>6} {'faults':>8} {'peak MB':>9} {'mem':>6} "
             f"{'dropout/this':>12}"]
    for r in result["variants"]:
        lines.append(
            f"{r['name']:<10} {where[r['name']]:<{width}} {r['heads']:>5} "
            f"{r['params'] / 1e6:>9.2f} {r['step_ms']:>9.1f} {r['time_ratio']:>6.2f} "
            f"{r['time_ratio_min']:>6.2f} {r['flop_ratio']:>6.2f} {r['minor_faults']:>8,.0f} "
            f"{r['mem_mb']:>9.1f} {r['mem_ratio']:>6.2f} {r['dropout_mem_over']:>12.2f}")
    for s in result["skipped"]:
        lines.append(f"{s['name']:<10} skipped: {s['reason']}")
    lines += ["",
              "time, FLOPs, mem: over the plain model's (time: median step; (min): fastest "
              "repeats; FLOPs: forward + backward);",
              "faults: median minor page faults per step (on the CPU: memory the allocator "
              "gave back and touches again, system time);",
              "dropout/this: the dropout views' peak memory over this variant's; a step is "
              "forward, loss, backward (no optimizer);",
              f"loss: {result['loss']}; mem: {result['mem_method']}"]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The result as JSON (a non-finite ratio would be invalid JSON: it is an error)."""
    return finite_json(result, result["variants"],
                       ("time_ratio", "flop_ratio", "mem_ratio", "dropout_mem_over"), "name")


def _points(text: str) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] or None


def parse_args(argv: Sequence[str] | None = None) -> tuple[IntraBenchConfig, bool]:
    """The configuration and whether to print JSON."""
    d = IntraBenchConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--num-classes", type=int, default=None, help="default: the model's")
    ap.add_argument("--samples", type=int, default=d.samples, help="K: samples per dropout point")
    ap.add_argument("--dropout-split", type=_points, default=None,
                    help="dropout points, comma-separated (empty: the model's own dropout "
                         "modules, else its last split point)")
    ap.add_argument("--dropout-p", type=float, default=d.dropout_p,
                    help="probability of the dropouts inserted at points that are not dropout "
                         "modules")
    ap.add_argument("--tree-split", type=_points, default=None,
                    help="the tree's split points (empty: the n middle split points, which are "
                         "adjacent modules in a model that lists every module, like VGG: "
                         "give stage ends there)")
    ap.add_argument("--tree-execution", choices=EXECUTION_MODES, default=d.tree_execution,
                    help="how the tree's sibling copies run")
    ap.add_argument("--same-points", action=argparse.BooleanOptionalAction, default=True,
                    help="also a tree at the dropout graph's points")
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--threads", type=int, default=d.threads, help="0: torch's default")
    ap.add_argument("--clock", choices=("wall", "process"), default=d.clock)
    ap.add_argument("--device", default=None, help="default: cuda when there is one")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    cfg = IntraBenchConfig(
        model=args.model, image_size=args.image_size, batch_size=args.batch_size,
        num_classes=args.num_classes, samples=args.samples, dropout_split=args.dropout_split,
        dropout_p=args.dropout_p, tree_split=args.tree_split, tree_execution=args.tree_execution,
        same_points=args.same_points, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads or None, clock=args.clock, device=args.device, seed=args.seed)
    return cfg, args.json


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the command line asks for; 2 (one line on stderr) for a bad option."""
    cfg, as_json = parse_args(argv)
    return run_tool(run, cfg, as_json, to_json, format_table)


if __name__ == "__main__":
    sys.exit(main())
