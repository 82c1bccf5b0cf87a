"""What the training engine costs around the step: ``train_epoch`` against a bare PyTorch loop.

    python tools/bench_engine.py                      # cifar_resnet20, 32 px, batch 64
    python tools/bench_engine.py --steps 20 --repeats 7 --warmup 2 --threads 1 --json

Two models, each in its own block of one process: ``single`` (graph ``tree`` with one head and
no split, objective ``single``: the demo's baseline) and ``tree`` (graph ``tree``, ``--heads``
heads at ``--split``, objective ``consensus``: the demo's method). Every other recipe key is
its default, except ``train.batch_size``, ``data.image_size``, ``run.progress=false`` (no bar
on the terminal; the engine still formats the loss for the bar's postfix, ``.item()``
included) and ``run.dir`` (a temporary directory).

The comparison, per model:

- ``engine``: :func:`collabsurgery.train.engine.setup` builds the session from the recipe
  (graph + objective built by ``build_net`` and ``build_objective_from``, Accelerate, timm's
  optimizer and schedule, the built-in digits). Its batch provider is then replaced by one
  that yields ``--steps`` pre-collated batches held in memory (the first batches of the
  session's own provider, on the device Accelerate chose), and one timed round is one call of
  ``train_epoch(session)`` over them (``progress.batch`` set back to 0 before each). So the
  round runs the engine's real per-batch code, unchanged: the global RNG re-seeded per batch,
  ``Step`` built, ``_train_step`` (``accelerator.accumulate``, ``autocast``, loss x
  ``loss_weight``, ``isfinite`` + ``set_trigger``/``check_trigger``, ``accelerator.backward``,
  the optimizer's step and ``zero_grad``), the running loss sum, the scheduler's update, the
  progress bar's postfix and the checkpoint test, plus what ``train_epoch`` does once per call
  (``set_epoch``, ``model.train()``, the disabled tqdm bar), spread over the round's steps.
- ``bare``: the same graph and objective built the same way (``set_seed(recipe.seed)``, then
  ``build_net``, ``build_objective_from``, ``attach``: the engine's initial weights, which the
  tool checks), a plain ``torch.optim.SGD`` with the recipe's lr, momentum and Nesterov flag
  over the engine optimizer's own parameter groups (timm's: no weight decay on norm weights and
  biases) and a loop over the same in-memory batches::

      loss = objective(graph.run(x, wants=objective.wants), y, step, graph).loss * loss_weight
      loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

  with one ``Step`` built before the loop (``loss_weight`` is 1.0 for both models here; it is
  kept so the two losses are the same number). No RNG re-seed, no scheduler, no check.

Data loading is outside both (the same tensors, already collated and on the device), so the
ratio is the engine's bookkeeping around identical forward/backward/optimizer work. Before
timing, the tool checks that the comparison is like for like: both start from the same weights
and, on the same first batch (engine RNG re-seed replayed for the bare loop), give the same
loss; an ``auto`` execution choice the engine made on that first step is replayed into the
bare graph, so both run the same execution modes. Then ``--warmup`` untimed rounds and
``--repeats`` timed rounds, interleaved (engine, bare, engine, bare, ...), so drifts of a
shared machine hit both alike.

Why ``train_epoch`` itself rather than a copy of its per-batch lines timed in a loop: the
engine's real loop is what a run pays, it stays what is measured when the engine changes, and
what it does once per call (a few microseconds) is negligible over ``--steps`` steps.

Reported per model: the median ms/step of each (round time / steps), their ratio
engine / bare (and ``ratio_min``, of the fastest rounds), the median and range of the
per-round (paired) ratios, and each side's run-to-run spread ((max - min) / median of its
rounds). Times are CUDA events on a GPU; on the CPU the process's CPU time (``--clock
process``, the default: a shared machine disturbs it far less; use one thread) or the wall
clock.

``--breakdown`` adds, for the first model, what each piece of per-batch work the engine does
beyond the bare loop costs on its own: every piece called ``--breakdown-calls`` times on the
session's own objects (its accelerator, optimizer, schedule, a scalar loss), the best of 5 such
loops, in microseconds per call, each named by the engine's line. These are isolated costs:
inside a step, with caches cold after the convolutions, they cost 1.5-8x more on the CPU
(docs/benchmarks.md), and a piece that waits for the device, as ``.item()`` does on a GPU,
costs more too; the pieces that format stack traces (``torch.manual_seed`` on a machine without the
GPU backends torch was built for) cost more the deeper the call stack, so they are called
as deep in the stack as ``train_epoch`` re-seeds here.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from collabsurgery.config.recipe import recipe_from_dict
from collabsurgery.errors import UserError
from collabsurgery.measure.bench import (_Timer, check_timing, device_name, finite_json,
                                         run_tool, torch_threads)
from collabsurgery.objectives import Step
from collabsurgery.train import engine

MODELS = ("single", "tree")


@dataclass
class EngineBenchConfig:
    """What to measure (see the module docstring)."""

    model: str = "cifar_resnet20"
    image_size: int = 32
    batch_size: int = 64
    steps: int = 10  # training steps per timed round
    repeats: int = 5
    warmup: int = 1
    heads: int = 4
    split: list[str] = field(default_factory=lambda: ["layer1", "layer2"])
    models: list[str] = field(default_factory=lambda: list(MODELS))
    source: str = "builtin:digits"
    threads: int | None = 1
    clock: str = "process"
    seed: int = 0
    breakdown: bool = False
    breakdown_calls: int = 2000

    def check(self) -> None:
        """UserError for a setting that cannot be measured."""
        check_timing(self.repeats, self.warmup, self.clock, self.batch_size, self.image_size)
        if self.steps < 1 or self.breakdown_calls < 1:
            raise UserError(f"steps and breakdown calls must be >= 1, got {self.steps} and "
                            f"{self.breakdown_calls}")
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise UserError(f"unknown model '{unknown[0] if unknown else ''}'; valid: "
                            f"{', '.join(MODELS)}")


def recipe_for(cfg: EngineBenchConfig, which: str, run_dir: str):
    """The recipe of model ``which``: the demo's single-model baseline or its tree."""
    if which == "single":
        graph, objective = {"pattern": "tree", "heads": 1, "split": []}, {"name": "single"}
    else:
        graph = {"pattern": "tree", "heads": cfg.heads, "split": list(cfg.split)}
        objective = {"name": "consensus"}
    return recipe_from_dict({
        "name": f"bench-engine-{which}", "seed": cfg.seed, "model": {"name": cfg.model},
        "graph": graph, "objective": objective,
        "data": {"source": cfg.source, "image_size": cfg.image_size},
        "train": {"batch_size": cfg.batch_size},
        "run": {"dir": run_dir, "progress": False, "checkpoint_every": 0}})


class InMemoryBatches:
    """A batch provider (what ``train_epoch`` reads) over pre-collated ``(x, labels)`` pairs."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.items = list(batches)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to select: the same tensors every epoch."""

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held batches from ``skip`` on."""
        yield from self.items[skip:]


def first_batches(session: engine.Session, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of the session's own provider (epoch 0), collated and on its
    device; cycled when an epoch has fewer."""
    session.batches.set_epoch(0)
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    for x, labels in session.batches.batches():
        held.append((x.clone(), labels.clone()))
        if len(held) == n:
            return held
    if not held:
        raise UserError("the training data gives no full batch; lower --batch-size")
    return [held[i % len(held)] for i in range(n)]


class Bare:
    """The bare PyTorch loop over the engine's graph and objective, built the same way."""

    def __init__(self, session: engine.Session):
        recipe, t = session.recipe, session.recipe.train
        num_classes = session.graph.head_spec(0).kwargs["num_classes"]
        set_seed(recipe.seed)  # what setup() does right before building them
        self.graph = engine.build_net(recipe, num_classes)
        self.objective = engine.build_objective_from(recipe)
        self.objective.check_compatible(self.graph.num_heads, num_classes)
        self.objective.attach(self.graph)
        if t.channels_last:
            self.graph = self.graph.to(memory_format=torch.channels_last)
        both = engine.Collaboration(self.graph, self.objective)  # parameter names only
        device = session.accelerator.device
        both.to(device).train()
        mine = dict(both.named_parameters())
        name_of = {id(p): n for n, p in session.collaboration.named_parameters()}
        groups = [{"params": [mine[name_of[id(p)]] for p in g["params"]],
                   "weight_decay": g.get("weight_decay", t.weight_decay)}
                  for g in session.optimizer.param_groups]
        self.optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum,
                                         nesterov=t.nesterov and t.momentum > 0)
        engine_state = session.collaboration.state_dict()
        self.same_init = all(torch.equal(v, engine_state[k])
                             for k, v in both.state_dict().items()) and \
            engine_state.keys() == both.state_dict().keys()
        self.weight = self.graph.loss_weight

    def step(self, x: torch.Tensor, labels: torch.Tensor, step: Step) -> torch.Tensor:
        """One training step; the loss, detached."""
        objective = self.objective
        loss = objective(self.graph.run(x, wants=objective.wants), labels, step,
                         self.graph).loss * self.weight
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def step_of(session: engine.Session, batch: int, batches: int) -> Step:
    """The ``Step`` the engine builds for ``batch`` of epoch 0 out of ``batches``."""
    t = session.recipe.train
    return Step(session.recipe.seed, 0, batch, t.epochs, batches, t.grad_accum)


def first_losses(session: engine.Session, bare: Bare, batch: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[float, float]:
    """The loss of each on the same first batch, from the same weights: the engine's from
    ``train_epoch`` over that one batch, the bare loop's after the engine's per-batch re-seed
    (and the engine's ``auto`` execution choices, made on that step)."""
    session.batches = InMemoryBatches([batch])
    session.progress.batch = 0
    engine.train_epoch(session)
    engine_loss = session.loss_sum.item()
    bare.graph.replay_execution_choices(session.graph.execution_choices())
    torch.manual_seed(engine.step_seed(session.recipe.seed, session.progress.epoch, 0,
                                       session.accelerator.process_index))
    bare_loss = bare.step(*batch, step_of(session, 0, 1)).item()
    return engine_loss, bare_loss


def _depth() -> int:
    """Frames on the stack of the caller."""
    return len(inspect.stack(0)) - 1


def _at_depth(depth: int, fn: Callable[[], float]) -> float:
    """``fn()`` called ``depth`` frames below here (stack traces cost by depth)."""
    return fn() if depth <= 0 else _at_depth(depth - 1, fn)


def breakdown(session: engine.Session, calls: int, depth: int) -> list[dict]:
    """What the engine's per-batch extras cost alone, microseconds per call (module docstring);
    a piece that this version of the engine or Accelerate lacks is skipped with the reason."""
    accelerator, t = session.accelerator, session.recipe.train
    loss = torch.tensor(2.5, device=accelerator.device)
    total = torch.zeros((), device=accelerator.device)
    opt = session.optimizer
    inner = getattr(opt, "optimizer", opt)
    bar = tqdm([], disable=True)
    seed = session.recipe.seed

    def contexts() -> None:
        with accelerator.accumulate(session.model):
            with accelerator.autocast():
                pass

    def trigger() -> None:
        if not torch.isfinite(loss):
            accelerator.set_trigger()
        accelerator.check_trigger()

    def lomo() -> None:
        import accelerate.optimizer
        accelerate.optimizer.is_lomo_available()
        accelerate.optimizer.is_lomo_available()

    def add() -> None:
        total.add_(loss)

    pieces: list[tuple[str, str, Callable[[], Any]]] = [
        ("reseed", "torch.manual_seed(step_seed(seed, epoch, batch, rank))",
         lambda: torch.manual_seed(engine.step_seed(seed, 0, 1, accelerator.process_index))),
        ("reseed, CPU generator only", "torch.default_generator.manual_seed(step_seed(...))",
         lambda: torch.default_generator.manual_seed(engine.step_seed(seed, 0, 1, 0))),
        ("Step", "Step(seed, epoch, batch, epochs, batches, grad_accum)",
         lambda: Step(seed, 0, 1, t.epochs, 10, t.grad_accum)),
        ("contexts", "with accelerator.accumulate(model): with accelerator.autocast():",
         contexts),
        ("non-finite check", "if not torch.isfinite(loss): set_trigger(); check_trigger()",
         trigger),
        ("backward's scaling", "accelerator.backward: loss / gradient_accumulation_steps",
         lambda: loss / accelerator.gradient_accumulation_steps),
        ("optimizer.step wrapper", "AcceleratedOptimizer.step: is_lomo_available() x2 "
         "(importlib find_spec)", lomo),
        ("zero_grad wrapper", "AcceleratedOptimizer.zero_grad: inspect.signature(...)",
         lambda: inspect.signature(inner.zero_grad)),
        ("loss sum", "session.loss_sum += loss", add),
        ("schedule", "session.scheduler.after_update(global_step)",
         lambda: session.scheduler.after_update(7)),
        ("progress postfix", "bar.set_postfix(loss=f'{loss.item():.3f}', refresh=False)",
         lambda: bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)),
    ]
    rows = []
    for name, line, fn in pieces:
        def loop(fn=fn) -> float:
            best = math.inf
            for _ in range(5):
                begin = time.perf_counter()
                for _ in range(calls):
                    fn()
                best = min(best, time.perf_counter() - begin)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            return best / calls
        try:
            seconds = _at_depth(depth - _depth(), loop)
        except (AttributeError, TypeError, ImportError) as err:
            rows.append(dict(name=name, line=line, us=None, skipped=f"{type(err).__name__}: "
                                                                   f"{err}"))
            continue
        rows.append(dict(name=name, line=line, us=seconds * 1e6, skipped=None))
    bar.close()
    return rows


def _spread(times: list[float]) -> float:
    return (max(times) - min(times)) / statistics.median(times)


def measure(cfg: EngineBenchConfig, which: str, log: Callable[[str], None]) -> dict:
    """One model's row: the like-for-like check, then interleaved timed rounds."""
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as run_dir:
        recipe = recipe_for(cfg, which, run_dir)
        log(f"{which}: setting up the engine")
        session = engine.setup(recipe)
        held = first_batches(session, cfg.steps)
        bare = Bare(session)
        depth, seed_of = [0], engine.step_seed

        def probe(*parts: int) -> int:  # how deep train_epoch re-seeds, for the breakdown
            depth[0] = max(depth[0], _depth() - 1)
            return seed_of(*parts)

        with _patched(engine, "step_seed", probe):
            engine_loss, bare_loss = first_losses(session, bare, held[0])

        session.batches = InMemoryBatches(held)
        bare_step = step_of(session, 0, len(held))

        def engine_round() -> None:
            session.progress.batch = 0
            if not engine.train_epoch(session):
                raise RuntimeError("train_epoch stopped before the end of the held batches")

        def bare_round() -> None:
            for x, labels in held:
                bare.step(x, labels, bare_step)

        timer = _Timer(session.accelerator.device, cfg.clock)
        rounds: dict[str, list[float]] = {"engine": [], "bare": []}
        for r in range(cfg.warmup + cfg.repeats):
            log(f"{which}: {'warm-up' if r < cfg.warmup else 'repeat'} "
                f"{r + 1}/{cfg.warmup + cfg.repeats}")
            for name, fn in (("engine", engine_round), ("bare", bare_round)):
                seconds = timer(fn)
                if r >= cfg.warmup:
                    rounds[name].append(seconds / len(held))
        paired = [e / b for e, b in zip(rounds["engine"], rounds["bare"])]
        engine_ms = statistics.median(rounds["engine"]) * 1e3
        bare_ms = statistics.median(rounds["bare"]) * 1e3
        row = dict(
            name=which, pattern=recipe.graph.pattern, heads=session.graph.num_heads,
            split=list(recipe.graph.args.get("split") or []), objective=recipe.objective.name,
            params=sum(p.numel() for p in session.collaboration.parameters()),
            engine_ms=engine_ms, bare_ms=bare_ms, ratio=engine_ms / bare_ms,
            ratio_min=min(rounds["engine"]) / min(rounds["bare"]),
            paired_ratio=statistics.median(paired), paired_ratio_min=min(paired),
            paired_ratio_max=max(paired), engine_spread=_spread(rounds["engine"]),
            bare_spread=_spread(rounds["bare"]),
            engine_round_ms=[t * 1e3 for t in rounds["engine"]],
            bare_round_ms=[t * 1e3 for t in rounds["bare"]],
            same_init=bare.same_init, first_loss_engine=engine_loss, first_loss_bare=bare_loss,
            loss_weight=bare.weight, engine_optimizer=type(session.optimizer.optimizer
                                                           if hasattr(session.optimizer,
                                                                      "optimizer")
                                                           else session.optimizer).__name__,
            execution=session.graph.describe_execution().splitlines())
        if cfg.breakdown:
            log(f"{which}: timing the engine's per-batch extras alone")
            row["breakdown"] = breakdown(session, cfg.breakdown_calls, depth[0])
            row["breakdown_depth"] = depth[0]
        device = session.accelerator.device
        session.accelerator.end_training()
    return dict(row=row, device=device)


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def run(cfg: EngineBenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure ``cfg``; returns a JSON-ready dict (see the module docstring for each field)."""
    cfg.check()
    with torch_threads(cfg.threads):
        rows, device = [], None
        for i, which in enumerate(cfg.models):
            got = measure(cfg if i == 0 else dataclasses.replace(cfg, breakdown=False),
                          which, log)
            rows.append(got["row"])
            device = got["device"]
        cuda = device.type == "cuda"
        return dict(config=asdict(cfg), device=device_name(device), torch=torch.__version__,
                    threads=None if cuda else torch.get_num_threads(),
                    clock="cuda events" if cuda else cfg.clock, models=rows)


def format_table(result: dict) -> str:
    """The result as a table a person can read."""
    cfg = result["config"]
    lines = [f"{cfg['model']} {cfg['image_size']} px, batch {cfg['batch_size']}, fp32, "
             f"{cfg['steps']} steps per round, data: {cfg['source']} (held in memory)",
             f"device: {result['device']}; threads: {result['threads'] or '-'}; clock: "
             f"{result['clock']}; medians of {cfg['repeats']} rounds after {cfg['warmup']} "
             "warm-up round(s), engine and bare interleaved",
             "",
             f"{'model':<8} {'heads':>5} {'engine ms':>10} {'bare ms':>9} {'ratio':>6} "
             f"{'(min)':>6} {'paired (min-max)':>20} {'spread e/b':>12} {'first loss e/b':>18}"]
    for r in result["models"]:
        paired = f"{r['paired_ratio']:.3f} ({r['paired_ratio_min']:.3f}-" \
                 f"{r['paired_ratio_max']:.3f})"
        spread = f"{r['engine_spread']:.1%}/{r['bare_spread']:.1%}"
        losses = f"{r['first_loss_engine']:.5f}/{r['first_loss_bare']:.5f}"
        lines.append(f"{r['name']:<8} {r['heads']:>5} {r['engine_ms']:>10.2f} "
                     f"{r['bare_ms']:>9.2f} {r['ratio']:>6.3f} {r['ratio_min']:>6.3f} "
                     f"{paired:>20} {spread:>12} "
                     f"{losses:>18}")
    lines += ["",
              "ms: median per step (round time / steps); ratio: engine / bare medians ((min): "
              "of the fastest rounds);",
              "paired: the per-round ratios (engine and bare back to back), median (min-max);",
              "spread: (max - min) / median of each side's rounds; first loss: both on the same "
              "first batch from the same weights",
              "engine: train_epoch over in-memory batches; bare: loss, backward, SGD step, "
              "zero_grad (tools/bench_engine.py docstring)"]
    for r in result["models"]:
        if r.get("breakdown"):
            lines += ["", f"{r['name']}: the engine's per-batch extras alone, us per call (best "
                      f"of 5 x {cfg['breakdown_calls']} calls, {r['breakdown_depth']} frames "
                      "deep, as train_epoch runs)"]
            for b in r["breakdown"]:
                cost = f"{b['us']:>9.1f}" if b["us"] is not None else f"{'-':>9}"
                lines.append(f"  {b['name']:<28} {cost}  {b['line']}"
                             + (f"  (skipped: {b['skipped']})" if b["skipped"] else ""))
    bad = [r["name"] for r in result["models"] if not r["same_init"]]
    if bad:
        lines.append(f"WARNING: initial weights differ between engine and bare for {bad}")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The result as JSON (a non-finite ratio would be invalid JSON: it is an error)."""
    return finite_json(result, result["models"], ("engine_ms", "bare_ms", "ratio", "ratio_min"),
                       "name")


def _points(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineBenchConfig, bool]:
    """The configuration and whether to print JSON."""
    d = EngineBenchConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=d.model, help="the backbone of both models")
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--steps", type=int, default=d.steps, help="training steps per timed round")
    ap.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="untimed rounds")
    ap.add_argument("--heads", type=int, default=d.heads, help="the tree's heads")
    ap.add_argument("--split", type=_points, default=d.split,
                    help="the tree's split points, comma-separated")
    ap.add_argument("--models", type=_points, default=d.models,
                    help=f"which to measure, comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--source", default=d.source, help="data.source of the recipes")
    ap.add_argument("--threads", type=int, default=d.threads, help="0: torch's default")
    ap.add_argument("--clock", choices=("wall", "process"), default=d.clock)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each per-batch extra of the engine alone (first model)")
    ap.add_argument("--breakdown-calls", type=int, default=d.breakdown_calls)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    cfg = EngineBenchConfig(
        model=args.model, image_size=args.image_size, batch_size=args.batch_size,
        steps=args.steps, repeats=args.repeats, warmup=args.warmup, heads=args.heads,
        split=args.split, models=args.models, source=args.source,
        threads=args.threads or None, clock=args.clock, seed=args.seed,
        breakdown=args.breakdown, breakdown_calls=args.breakdown_calls)
    return cfg, args.json


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the command line asks for; 2 (one line on stderr) for a bad option."""
    cfg, as_json = parse_args(argv)
    return run_tool(run, cfg, as_json, to_json, format_table)


if __name__ == "__main__":
    sys.exit(main())
