"""The training loop: Accelerate end to end, exact resume, atomic checkpoints.

``train(recipe)`` is the one place a recipe becomes objects (data, training graph, objective,
optimizer); everything below it takes plain arguments. It is three parts, each short:

    setup(recipe)                   data, graph + objective, optimizer, Accelerate, resume
    for epoch:
        train_epoch(session)        for each batch (global RNG re-seeded from (seed, epoch,
                                    batch, rank)): loss = objective(graph.run(x), y, step)
                                    x graph.loss_weight; stop every rank if it is not finite;
                                    backward; step; checkpoint every N optimizer steps
        end_epoch(session)          evaluate every head and the ensemble on hold-out and test;
                                    log; checkpoint

What Accelerate prepares, optimises, syncs and checkpoints is :class:`Collaboration`: the graph
and the objective together, so modules an objective owns (a gate, attention) train too. Export
reads only the graph's part.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from collabsurgery.common import atomic
from collabsurgery.common.integrity import describe_names, non_finite
from collabsurgery.common.seeding import derive_seed
from collabsurgery.config.recipe import Recipe, data_arguments, recipe_to_dict, save_recipe
from collabsurgery.data.batches import SharedBatches, SubsetBatches, loader_options
from collabsurgery.data.datasets import Splits, load_splits
from collabsurgery.errors import ArgumentError, TrainingStopped, UserError, warn
from collabsurgery.export.from_run import export_from_source
from collabsurgery.export.teacher import load_teacher
from collabsurgery.graphs import TrainingGraph, build_graph, builder_arguments
from collabsurgery.objectives import (OBJECTIVES, TEACHER_KEYS, LossOutput, Objective, Step,
                                      build_objective, check_objective_arguments)
from collabsurgery.rundir import checkpoint, metrics
from collabsurgery.rundir import lock as run_lock
from collabsurgery.train import ema as weight_ema
from collabsurgery.train import preflight
from collabsurgery.train.evaluate import evaluate
from collabsurgery.train.optim import Schedule, current_lr, make_optimizer, make_schedule
from collabsurgery.train.soft_targets import SoftTargets, check_soft_targets, soft_targets_asked


def step_seed(*parts: int) -> int:
    """The global RNG's seed for one batch, from (seed, epoch, batch, rank)."""
    return derive_seed("step", *parts)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the CPU's and ``device``'s global RNGs, as ``torch.manual_seed`` seeds them.

    ``torch.manual_seed`` also seeds every other backend torch was built for, and one that is
    not initialised (CUDA on a CPU run; XPU and MTIA on a CUDA run) queues the seed with a
    formatted stack trace: 0.2-0.45 ms a batch (docs/benchmarks.md, "What the engine costs").
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def run_directory(recipe: Recipe) -> Path:
    """Where a recipe's run lives: ``run.dir / (run.name or name)``."""
    return Path(recipe.run.dir) / (recipe.run.name or recipe.name)


def build_net(recipe: Recipe, num_classes: int, pretrained: bool = True) -> TrainingGraph:
    """The training graph a recipe asks for; ``pretrained=False`` skips ``model.pretrained``
    (a resumed run loads every weight from its checkpoint, so the file need not exist)."""
    given = recipe.model.kwargs.get("num_classes", num_classes)
    if given != num_classes:
        raise UserError(f"recipe key 'model.kwargs.num_classes' is {given!r} but the data has "
                        f"{num_classes} classes; leave it out (it is set from the data)")
    size = recipe.data.image_size
    args = dict(recipe.graph.args)
    if "seed" in builder_arguments(recipe.graph.pattern):  # random structure (routes): seeded
        args.setdefault("seed", recipe.seed)
    with tempfile.TemporaryDirectory(prefix="collabsurgery-pretrained-") as tmp:
        try:
            weights = _pretrained_files(recipe.model.pretrained, Path(tmp)) if pretrained \
                else None
            return build_graph(recipe.graph.pattern, recipe.model.name,
                               model_kwargs={"num_classes": num_classes, **recipe.model.kwargs},
                               input_size=(3, size, size), pretrained=weights, **args)
        except ArgumentError as err:
            raise _recipe_key_error("model" if err.argument == "pretrained" else "graph",
                                    err) from None


def _pretrained_files(value: Any, tmp: Path) -> Any:
    """``model.pretrained`` with every training run directory in it replaced by an export of
    the head that run keeps (its method's choice: the best on hold-out, OKDDip's leader),
    written under ``tmp``; files, ``true`` and null pass through."""
    if isinstance(value, list):
        return [_pretrained_files(v, tmp / str(i)) for i, v in enumerate(value)]
    if isinstance(value, str) and (Path(value) / "graph.json").is_file():
        tmp.mkdir(parents=True, exist_ok=True)
        path, _ = export_from_source(Path(value), None, tmp / "backbone.safetensors")
        return str(path)
    return value


def build_objective_from(recipe: Recipe) -> Objective:
    """The objective a recipe asks for, with its arguments (a teacher loaded first)."""
    return make_objective(recipe.objective.name, recipe.objective.args)


def make_objective(name: str, args: dict[str, Any]) -> Objective:
    """Objective ``name`` built from recipe-style ``args``: for one that ``needs_teacher`` the
    teacher keys are loaded into a module first; a bad argument names its recipe key."""
    try:
        args = dict(args)
        teacher = None
        if name in OBJECTIVES and OBJECTIVES[name].needs_teacher:
            teacher_args = {key: args.pop(key) for key in TEACHER_KEYS if key in args}
            if "teacher" not in teacher_args:
                raise ArgumentError("teacher", "is missing; valid: an export file, a run "
                                    "directory, or a model name with teacher_weights")
            check_objective_arguments(name, args)
            teacher = teacher_args["teacher"]
            args["teacher"] = load_teacher(**teacher_args)
        objective = build_objective(name, **args)
    except ArgumentError as err:
        raise _recipe_key_error("objective", err) from None
    if teacher is not None:
        objective.teacher_source = str(teacher)
    return objective


def _recipe_key_error(section: str, err: ArgumentError) -> UserError:
    """A builder's or objective's complaint about one argument, as the recipe key."""
    return UserError(f"recipe key '{section}.{err.argument}' {err.problem}")


class Collaboration(torch.nn.Module):
    """A training graph and its objective: one forward from a batch to the loss."""

    def __init__(self, graph: TrainingGraph, objective: Objective):
        super().__init__()
        self.graph = graph
        self.objective = objective
        # the EMA of the graph for an objective that wants_temporal_mean; in a tuple so that it
        # stays outside this module's parameters and state (the engine's EMA checkpoints it)
        self.temporal_mean: tuple[TrainingGraph, ...] = ()

    def forward(self, x: torch.Tensor, labels: torch.Tensor, step: Step) -> LossOutput:
        """The objective's loss on the graph's output (the features it wants included)."""
        out = self.graph.run(x, wants=self.objective.wants)
        return self.objective(out, labels, step, self.graph, *self.temporal_mean)


def _resume_point(recipe: Recipe, ckpt_dir: Path
                  ) -> tuple[Path, checkpoint.Loaded] | None:
    """The checkpoint to resume from, loaded: the newest intact one for ``auto`` (damaged newer
    ones are reported and skipped), the one named, or None for a new run."""
    mode = recipe.run.resume
    if mode == "no":
        if checkpoint.candidates(ckpt_dir):
            raise UserError(f"{ckpt_dir.parent} already holds checkpoints; set run.resume=auto to "
                            "continue that run, or choose another run.name")
        return None
    if mode == "auto":  # an interrupted complete save counts; what cannot be used is said
        return checkpoint.load_for_resume(ckpt_dir, warn)
    path = Path(mode)
    if not path.is_dir() or path.name.endswith(".tmp"):
        raise UserError(f"run.resume '{mode}' is not a complete checkpoint directory; valid: "
                        "no, auto, or a checkpoints/ckpt-N directory")
    return path, checkpoint.load(path)


def _kept_checkpoint(session: Session) -> str:
    """What a stopped run leaves to resume from, in words."""
    ckpts = checkpoint.candidates(session.checkpoints)
    if ckpts:
        return f"the last good checkpoint is {ckpts[0]}"
    every = session.recipe.run.checkpoint_every
    when = f"every {every} optimizer steps and " if every else ""
    return f"no checkpoint was written yet (they are written {when}at the end of every epoch)"


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in recipe_to_dict(recipe).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


@dataclass
class Session:
    """Everything :func:`setup` builds for one run; the loop functions read and advance it."""

    recipe: Recipe
    accelerator: Accelerator
    run_dir: Path
    model: torch.nn.Module             # the prepared Collaboration (DDP-wrapped on many ranks)
    collaboration: Collaboration       # the same, unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    batches: SharedBatches | SubsetBatches
    holdout: DataLoader
    test: DataLoader
    progress: checkpoint.Progress = field(default_factory=checkpoint.Progress)
    loss_sum: torch.Tensor | None = None  # the epoch's summed loss so far (this rank)
    loss_count: int = 0
    execution_settled: bool = False  # every process runs the main process's auto choices
    soft_targets: SoftTargets | None = None  # Mixup/CutMix/smoothing, when asked
    ema: Any = None  # timm's ModelEmaV3 of the graph (train.ema_decay), or None
    run_lock: run_lock.RunLock | None = None  # the main process's hold on the run directory

    @property
    def graph(self) -> TrainingGraph:
        return self.collaboration.graph

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def done(self) -> bool:
        """Whether ``train.max_steps`` optimizer steps have been taken."""
        steps = self.recipe.train.max_steps
        return steps is not None and self.progress.global_step >= steps


def _batch_provider(recipe: Recipe, splits: Splits, graph: TrainingGraph,
                    objective: Objective, processes: int,
                    pin_memory: bool = False) -> SharedBatches | SubsetBatches:
    t, data, views = recipe.train, recipe.data, recipe.data.views
    loading = dict(pin_memory=pin_memory, prefetch_factor=data.prefetch_factor)
    if len(splits.train) < t.batch_size * processes:
        raise UserError(f"train.batch_size={t.batch_size} x {processes} processes exceeds the "
                        f"{len(splits.train)} training examples")
    if data.subsets:
        if graph.num_heads < 2:
            raise UserError("data.subsets=true splits the training examples among the heads, "
                            "but this graph has 1 head; set data.subsets=false")
        if not graph.per_head_input:
            raise UserError(f"data.subsets=true gives each head its own batch; pattern "
                            f"'{recipe.graph.pattern}' shares layers between heads and takes one "
                            "batch; valid patterns: instances, peers, routed")
        if not objective.own_examples:
            raise UserError(f"objective '{recipe.objective.name}' compares the heads example by "
                            "example, but data.subsets=true gives each head different examples; "
                            "valid with subsets: objectives " + ", ".join(
                                n for n, c in OBJECTIVES.items() if c.own_examples))
        if views == "per_head":
            raise UserError("data.subsets=true already gives each head its own images, so "
                            "data.views=per_head (its own view of the same images) cannot apply; "
                            "set data.views=shared or data.subsets=false")
        return SubsetBatches(splits.train, graph.num_heads, t.batch_size, data.subset_overlap,
                             seed=recipe.seed, num_workers=data.num_workers, **loading)
    if views == "per_head":
        if not graph.per_head_input:
            raise UserError(f"data.views=per_head needs a graph whose heads run on their own "
                            f"batch (instances, peers, tree with graph.views=true); pattern "
                            f"'{recipe.graph.pattern}' shares layers between heads")
        if not recipe.data.augment:
            raise UserError("data.views=per_head gives each head its own augmentation of the "
                            "same images, but data.augment is false (every view would be the "
                            "same); set data.augment=true or data.views=shared")
        splits.train.views = graph.num_heads
    return SharedBatches(splits.train, t.batch_size, data.num_workers, **loading)


def setup(recipe: Recipe) -> Session:
    """Data, graph + objective, optimizer and Accelerate for ``recipe``, resumed if asked."""
    run_dir = run_directory(recipe)
    preflight.check_writable(run_dir)
    run_lock.check_free(run_dir)  # another trainer in it: refuse now, not after the set-up
    preflight.check_trackers(recipe.run.log_with, run_dir)
    recipe = preflight.runnable_precision(recipe)
    t = recipe.train
    weight_ema.check(t)
    seen = checkpoint.listing(run_dir / "checkpoints")
    resume_from = _resume_point(recipe, run_dir / "checkpoints")
    splits = load_splits(**data_arguments(recipe.data), seed=recipe.seed, model=recipe.model.name)
    if splits.settings:  # preset timm: the run records what the model's data config resolved
        recipe = replace(recipe, data=replace(recipe.data, **splits.settings))
    if resume_from is not None:
        preflight.check_same_training(run_dir, recipe)
    set_seed(recipe.seed)
    graph = build_net(recipe, splits.num_classes, pretrained=resume_from is None)
    objective = build_objective_from(recipe)
    objective.check_compatible(graph.num_heads, splits.num_classes)
    if objective.wants_temporal_mean:
        weight_ema.check_temporal_mean(t, recipe.objective.name)
    if objective.wants_views and recipe.data.views != "per_head":
        raise UserError(f"objective '{recipe.objective.name}' trains each head on its own "
                        f"augmentation of the batch, but data.views={recipe.data.views}; set "
                        "data.views=per_head")
    check_soft_targets(t, objective, recipe.objective.name, t.batch_size)
    if resume_from is not None:
        preflight.check_resumable(run_dir, graph)
    objective.attach(graph)
    # Accelerate keeps mixed precision in a process-wide singleton and refuses a second
    # Accelerator with another setting; forget it (not the process group) so that train() can
    # be called again in the same process with another recipe.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        log_with=list(recipe.run.log_with) or None, project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=graph.may_skip_modules)],
    )
    if t.channels_last:
        graph = graph.to(memory_format=torch.channels_last)
    if t.compile:
        preflight.check_compile(t.compile)
        try:
            graph.set_execution(compile=t.compile)  # regional: each stage's plan, as bench
        except UserError as err:
            raise UserError(f"recipe key 'train.compile' cannot apply: {err}") from None
    collaboration = Collaboration(graph, objective)
    optimizer = make_optimizer(collaboration, t)
    pin = accelerator.device.type == "cuda"
    batches = _batch_provider(recipe, splits, graph, objective, accelerator.num_processes, pin)
    loader_args = dict(batch_size=t.batch_size, **loader_options(
        recipe.data.num_workers, pin, recipe.data.prefetch_factor))
    model, optimizer, holdout, test = accelerator.prepare(
        collaboration, optimizer, DataLoader(splits.holdout, **loader_args),
        DataLoader(splits.test, **loader_args))
    batches.prepare(accelerator)
    steps_per_epoch = max(len(batches) // t.grad_accum, 1)
    scheduler = make_schedule(optimizer, t, steps_per_epoch)
    session = Session(recipe, accelerator, run_dir, model, accelerator.unwrap_model(model),
                      optimizer, scheduler, batches, holdout, test)
    session.ema = weight_ema.build(session.graph, t)
    if objective.wants_temporal_mean:
        session.collaboration.temporal_mean = (session.ema.module,)
    if soft_targets_asked(t):
        session.soft_targets = SoftTargets(t, splits.num_classes)
    resume_from = _take_run_directory(session, seen, resume_from)  # before the first write
    try:
        if resume_from is not None:
            _restore(session, *resume_from)
        # a resume keeps the record of what was trained (check_same_training: nothing differs)
        if accelerator.is_main_process and (resume_from is None or
                                            not (run_dir / "recipe.yaml").is_file()):
            save_recipe(recipe, run_dir / "recipe.yaml")
            atomic.write_text(run_dir / "graph.json", graph.config.to_json())
        if recipe.run.log_with:
            accelerator.init_trackers(run_dir.name, config=_flat_config(recipe))
    except BaseException:
        _release(session)
        raise
    return session


def _take_run_directory(session: Session, seen: tuple[str, ...],
                        resume_from: tuple[Path, checkpoint.Loaded] | None
                        ) -> tuple[Path, checkpoint.Loaded] | None:
    """Hold the run directory's lock (the main process, for the whole run) before anything is
    written, and settle what interrupted saves left (:func:`checkpoint.settle`). Every process
    stops with one line when another trainer holds the directory, or wrote checkpoints into it
    since ``seen`` (:func:`checkpoint.listing`) was read."""
    accelerator, problem = session.accelerator, None
    if accelerator.is_main_process:
        try:
            session.run_lock = run_lock.acquire(session.run_dir)
            if checkpoint.listing(session.checkpoints) != seen:
                problem = (f"{session.run_dir} changed while this run was starting (another "
                           "trainer wrote checkpoints into it); run the command again to "
                           "continue from them")
            else:  # an interrupted save resumed from takes its name; other leftovers go
                path = checkpoint.settle(session.checkpoints,
                                         resume_from[0] if resume_from else None, warn)
                if resume_from is not None:
                    resume_from = path, resume_from[1]
        except UserError as err:
            problem = str(err)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        _release(session)
        raise UserError(problem)
    return resume_from


def _release(session: Session) -> None:
    if session.run_lock is not None:
        session.run_lock.release()


def _restore(session: Session, path: Path, loaded: checkpoint.Loaded) -> None:
    model_state, states, progress = loaded
    graph_state, objective_state = checkpoint.split_state(model_state)
    if (session.ema is not None) != ("ema" in states):
        has = "holds EMA weights" if "ema" in states else "holds no EMA weights"
        raise UserError(f"checkpoint {path} {has} but this recipe's train.ema_decay is "
                        f"{session.recipe.train.ema_decay}; resume with the run's own recipe "
                        f"({session.run_dir / 'recipe.yaml'}) or choose another run.name")
    try:
        session.collaboration.graph.load_state_dict(graph_state)
        session.collaboration.objective.load_state_dict(objective_state)
        session.optimizer.load_state_dict(states["optimizer"])
        session.scheduler.load_state_dict(states["scheduler"])
        session.collaboration.graph.replay_execution_choices(progress.execution)
        if session.ema is not None:
            weight_ema.load(session.ema, states["ema"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"checkpoint {path} does not fit this recipe's graph, objective or "
                        f"optimizer ({first}); resume with the run's own recipe "
                        f"({session.run_dir / 'recipe.yaml'}) or choose another run.name") from None
    scaler = session.accelerator.scaler
    if "scaler" in states and scaler is not None:
        scaler.load_state_dict(states["scaler"])
    session.progress = progress
    session.accelerator.print(f"resumed from {path} (epoch {progress.epoch + 1}, "
                              f"batch {progress.batch})")


def save_checkpoint(session: Session) -> None:
    """Write a checkpoint of graph + objective, optimizer, scheduler and progress (atomic)."""
    accelerator, progress = session.accelerator, session.progress
    state = session.collaboration.state_dict()
    bad = non_finite(state)
    if bad:
        accelerator.set_trigger()
    if accelerator.check_trigger():  # a collective: every process stops together
        raise TrainingStopped(
            f"NaN or infinite values in the training state after optimizer step "
            f"{progress.global_step} ({describe_names(bad) or 'on another process'}); stopped "
            f"every process without writing a checkpoint; {_kept_checkpoint(session)}")
    # mid-epoch: keep the epoch's loss so far (a collective, so before the main-process test)
    mid_epoch = progress.batch > 0
    progress.loss_sum = accelerator.reduce(session.loss_sum, "mean").item() if mid_epoch else 0.0
    progress.loss_count = session.loss_count if mid_epoch else 0
    progress.execution = session.graph.execution_choices()
    if accelerator.is_main_process:
        states = {"optimizer": session.optimizer.state_dict(),
                  "scheduler": session.scheduler.state_dict()}
        if accelerator.scaler is not None:
            states["scaler"] = accelerator.scaler.state_dict()
        checkpoint.save(session.checkpoints, progress.global_step, state, states, progress,
                        session.recipe.run.keep,
                        None if session.ema is None else weight_ema.state(session.ema))
    accelerator.wait_for_everyone()


def _train_step(session: Session, x: torch.Tensor, labels: torch.Tensor, step: Step
                ) -> torch.Tensor:
    """Forward, the non-finite check on every rank, backward and an optimizer step."""
    accelerator, t = session.accelerator, session.recipe.train
    with accelerator.accumulate(session.model):
        with accelerator.autocast():
            out = session.model(x, labels, step)
        loss = out.loss * session.graph.loss_weight
        if not torch.isfinite(loss):
            accelerator.set_trigger()
        if accelerator.check_trigger():
            raise TrainingStopped(
                f"non-finite loss at epoch {step.epoch + 1}, batch {step.batch + 1}; stopped "
                f"every process; {_kept_checkpoint(session)}")
        accelerator.backward(loss)
        if accelerator.sync_gradients and t.grad_clip:
            accelerator.clip_grad_norm_(session.model.parameters(), t.grad_clip)
        session.optimizer.step()
        session.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _settle_execution(session: Session) -> None:
    """After the session's first step: ``auto`` timed the execution modes on every process and
    each may have chosen differently; all continue with the main process's choices."""
    accelerator, graph = session.accelerator, session.graph
    if accelerator.num_processes > 1:
        choices = broadcast_object_list([graph.execution_choices()])[0]
        if not accelerator.is_main_process:
            graph.replay_execution_choices(choices)
    session.execution_settled = True


def train_epoch(session: Session) -> bool:
    """Train the rest of the current epoch; False when ``max_steps`` stopped it early."""
    recipe, accelerator, progress = session.recipe, session.accelerator, session.progress
    epoch = progress.epoch
    session.batches.set_epoch(epoch)
    session.model.train()
    bar = tqdm(session.batches.batches(progress.batch), total=len(session.batches),
               initial=progress.batch, desc=f"epoch {epoch + 1}/{recipe.train.epochs}",
               leave=False,
               # None lets tqdm hide itself when stderr is not a terminal (CI logs)
               disable=None if accelerator.is_main_process and recipe.run.progress else True)
    resumed = progress.batch > 0
    session.loss_sum = torch.full((), progress.loss_sum if resumed else 0.0,
                                  device=accelerator.device)
    session.loss_count = progress.loss_count if resumed else 0
    for x, labels in bar:
        seed_step(step_seed(recipe.seed, epoch, progress.batch, accelerator.process_index),
                  accelerator.device)
        if session.soft_targets is not None:
            x, labels = session.soft_targets(x, labels, recipe.seed, epoch, progress.batch)
        if recipe.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        step = Step(recipe.seed, epoch, progress.batch, recipe.train.epochs, len(session.batches),
                    recipe.train.grad_accum)
        loss = _train_step(session, x, labels, step)
        if not session.execution_settled:
            _settle_execution(session)
        progress.batch += 1
        session.loss_sum += loss
        session.loss_count += 1
        if accelerator.sync_gradients:
            progress.global_step += 1
            session.scheduler.after_update(progress.global_step)
            if session.ema is not None:
                weight_ema.update(session.ema, session.graph, progress.global_step)
            if not bar.disable:  # .item() waits for the device: only for a bar that shows
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            every = recipe.run.checkpoint_every
            if (every and progress.global_step % every == 0) or session.done():
                save_checkpoint(session)
            if session.done():
                break
    return progress.batch >= len(session.batches)


def end_epoch(session: Session) -> dict[str, Any]:
    """Evaluate, record, log and checkpoint the epoch just finished; returns its record."""
    accelerator, progress, recipe = session.accelerator, session.progress, session.recipe
    objective = session.collaboration.objective
    holdout_outputs: list | None = [] if objective.wants_holdout else None
    record = {
        "epoch": progress.epoch + 1,
        "step": progress.global_step,
        "lr": current_lr(session.optimizer),
        "train_loss": accelerator.reduce(session.loss_sum, "mean").item()
        / max(session.loss_count, 1),
        "holdout": evaluate(session.graph, session.holdout, accelerator, holdout_outputs),
        "test": evaluate(session.graph, session.test, accelerator),
    }
    if session.ema is not None:  # {"holdout": ..., "test": ...} of the EMA weights
        record["ema"] = weight_ema.evaluate_ema(session.ema, session.graph, session.holdout,
                                                session.test, accelerator)
    if holdout_outputs is not None:
        objective.end_epoch(*holdout_outputs)
    progress.history.append(record)
    progress.epoch, progress.batch = progress.epoch + 1, 0
    session.scheduler.after_epoch(progress.epoch,  # plateau: on the best head's hold-out accuracy
                                  metrics.headline(record)["best_head_holdout_acc"])
    if recipe.run.log_with:
        accelerator.log(metrics.flat_scalars(record), step=progress.global_step)
    save_checkpoint(session)
    if accelerator.is_main_process:
        # Rewritten from the checkpointed history, so a crash never leaves a duplicate epoch.
        metrics.write_jsonl(session.run_dir / "metrics.jsonl", progress.history)
        h = metrics.headline(record)
        accelerator.print(f"epoch {record['epoch']}/{recipe.train.epochs}: loss "
                          f"{record['train_loss']:.4f}  test acc head0 {h['head0_test_acc']:.4f}"
                          f"  best head {h['best_head']} {h['best_head_test_acc']:.4f}  "
                          f"ensemble {h['ensemble_test_acc']:.4f}")
        if "ema" in record:
            accelerator.print(weight_ema.epoch_line(record))
    return record


def head_names(collaboration: Collaboration) -> list[str]:
    """Each head's role for the method and, in a mixed peer group, its architecture."""
    graph, objective = collaboration.graph, collaboration.objective
    archs = [graph.head_spec(h).qualified_name for h in range(graph.num_heads)]
    mixed = len(set(archs)) > 1
    return [", ".join(t for t in (arch if mixed else "", role) if t)
            for arch, role in zip(archs, objective.head_roles(graph.num_heads))]


def _finish(session: Session, trained: bool = True) -> None:
    """Write the run's summary and plot (unless this session ``trained`` nothing) and print
    its final table."""
    accelerator, history = session.accelerator, session.progress.history
    if accelerator.is_main_process and history:
        run_dir, final = session.run_dir, history[-1]
        if trained or not (run_dir / "summary.json").is_file():
            atomic.write_text(run_dir / "summary.json", json.dumps(
                {**metrics.headline(final, ema=session.recipe.train.ema_select),
                 "final": final, "num_processes": accelerator.num_processes,
                 "execution": session.graph.describe_execution().splitlines()}, indent=1))
            metrics.plot_history(history, run_dir / "accuracy.png", run_dir.name)
        accelerator.print(metrics.summary_table(final, head_names(session.collaboration)))
        if session.graph.config.kind == "dropout" and session.graph.num_heads > 1:
            accelerator.print("(one weight set: the heads are dropout views of one network, "
                              "and in evaluation every view is that same network, so their "
                              "rows agree and their diversity is 0)")
        accelerator.print(session.graph.describe_execution())
    accelerator.end_training()


def train(recipe: Recipe) -> Path:
    """Train ``recipe`` (or resume it) and return the run directory."""
    session = setup(recipe)
    try:
        finished = session.progress.epoch >= recipe.train.epochs
        if finished:
            session.accelerator.print(f"{session.run_dir} finished its {recipe.train.epochs} "
                                      "epochs already: nothing to train, its record unchanged")
        while session.progress.epoch < recipe.train.epochs and not session.done():
            if not train_epoch(session):
                break
            end_epoch(session)
        _finish(session, trained=not finished)
    finally:
        _release(session)  # also when it stops: the lock is the run's, not the process's
    return session.run_dir


def history_of(run_dir: Path) -> list[dict[str, Any]]:
    """Epoch records of a run, from its latest checkpoint (what export and reports read)."""
    found = checkpoint.load_latest(run_dir / "checkpoints")
    return found[1][2].history if found else []


__all__ = ["Collaboration", "Session", "TrainingStopped", "build_net", "end_epoch",
           "history_of", "run_directory", "save_checkpoint", "setup", "step_seed",
           "train", "train_epoch"]
