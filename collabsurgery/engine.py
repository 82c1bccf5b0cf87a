"""The training loop: Accelerate end to end, exact resume, atomic checkpoints.

``train(recipe)`` is the one place a recipe becomes objects (data, training graph, objective,
optimizer); everything below it takes plain arguments. The loop is short on purpose:

    for epoch:                      (data order seeded by seed + epoch)
        for batch:                  (global RNG re-seeded from (seed, epoch, batch, rank))
            logits = net(x)         [H, B, C]
            loss = objective(logits, y).loss * net.loss_weight
            stop every rank if the loss is not finite; backward; step
            checkpoint every N optimizer steps
        evaluate every head and the ensemble on hold-out and test; log; checkpoint
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, reporting
from .data import load_splits
from .errors import TrainingStopped, UserError
from .evaluate import evaluate
from .graphfile import config_to_json
from .graphs import TreeNet, wrap
from .objectives import build_objective
from .seeding import derive_seed
from .recipe import Recipe, recipe_to_dict, save_recipe


def step_seed(*parts: int) -> int:
    """The global RNG's seed for one batch, from (seed, epoch, batch, rank)."""
    return derive_seed("step", *parts)


def run_directory(recipe: Recipe) -> Path:
    """Where a recipe's run lives: ``run.dir / (run.name or name)``."""
    return Path(recipe.run.dir) / (recipe.run.name or recipe.name)


def build_net(recipe: Recipe, num_classes: int) -> TreeNet:
    """The training graph a recipe asks for."""
    g = recipe.graph
    kwargs = {"num_classes": num_classes, **recipe.model.kwargs}
    size = recipe.data.image_size
    return wrap(recipe.model.name, split=g.split, heads=g.heads, pattern=g.pattern,
                branches=g.branches, rescale=g.rescale, input_size=(3, size, size),
                execution=g.execution, checkpoint_branches=g.checkpoint_branches, **kwargs)


def build_objective_from(recipe: Recipe) -> torch.nn.Module:
    """The objective a recipe asks for, with only the arguments that objective takes."""
    o = recipe.objective
    arguments = {"consensus": {"temperature": o.temperature, "beta": o.beta},
                 "label_smoothing": {"smoothing": o.smoothing}}.get(o.name, {})
    return build_objective(o.name, **arguments)


def lr_factor(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (warm-up, then the schedule)."""
    t = recipe.train
    epoch = step / steps_per_epoch
    if epoch < t.warmup_epochs:
        return (epoch + 1 / steps_per_epoch) / t.warmup_epochs
    if t.schedule == "cosine":
        span = max(t.epochs - t.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - t.warmup_epochs) / span, 1.0)))
    if t.schedule == "step":
        return t.gamma ** sum(epoch >= m for m in t.milestones)
    return 1.0


def _resume_point(recipe: Recipe, ckpt_dir: Path) -> Path | None:
    mode = recipe.run.resume
    if mode == "no":
        if checkpoint.latest(ckpt_dir) is not None:
            raise UserError(f"{ckpt_dir.parent} already holds checkpoints; set run.resume=auto to "
                            "continue that run, or choose another run.name")
        return None
    if mode == "auto":
        return checkpoint.latest(ckpt_dir)
    path = Path(mode)
    if not (path / "state.json").is_file() or path.name.endswith(".tmp"):
        raise UserError(f"run.resume '{mode}' is not a complete checkpoint directory; valid: "
                        "no, auto, or a checkpoints/ckpt-N directory")
    return path


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in recipe_to_dict(recipe).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def train(recipe: Recipe) -> Path:
    """Train ``recipe`` (or resume it) and return the run directory."""
    t = recipe.train
    run_dir = run_directory(recipe)
    ckpt_dir = run_dir / "checkpoints"
    resume_from = _resume_point(recipe, ckpt_dir)
    # Accelerate keeps mixed precision in a process-wide singleton and refuses a second
    # Accelerator with another setting; forget it (not the process group) so that train() can
    # be called again in the same process with another recipe.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
        log_with=list(recipe.run.log_with) or None, project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.seed),
    )
    set_seed(recipe.seed)
    splits = load_splits(recipe.data, recipe.seed)
    net = build_net(recipe, splits.num_classes)
    objective = build_objective_from(recipe)
    if t.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum,
                                nesterov=t.nesterov and t.momentum > 0, weight_decay=t.weight_decay)
    loader_args = dict(batch_size=t.batch_size, num_workers=recipe.data.num_workers)
    if len(splits.train) < t.batch_size * accelerator.num_processes:
        raise UserError(f"train.batch_size={t.batch_size} x {accelerator.num_processes} processes "
                        f"exceeds the {len(splits.train)} training examples")
    train_loader = DataLoader(splits.train, shuffle=True, drop_last=True, **loader_args)
    holdout_loader = DataLoader(splits.holdout, **loader_args)
    test_loader = DataLoader(splits.test, **loader_args)
    net, optimizer, train_loader, holdout_loader, test_loader = accelerator.prepare(
        net, optimizer, train_loader, holdout_loader, test_loader)
    plain_net: TreeNet = accelerator.unwrap_model(net)
    steps_per_epoch = max(len(train_loader) // t.grad_accum, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, recipe))

    progress = checkpoint.Progress()
    if resume_from is not None:
        model_state, states, progress = checkpoint.load(resume_from)
        plain_net.load_state_dict(model_state)
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        if "scaler" in states and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(states["scaler"])
        accelerator.print(f"resumed from {resume_from} (epoch {progress.epoch + 1}, "
                          f"batch {progress.batch})")

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        (run_dir / "graph.json").write_text(config_to_json(plain_net.config))
    if recipe.run.log_with:
        accelerator.init_trackers(run_dir.name, config=_flat_config(recipe))

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        # mid-epoch: keep the epoch's loss so far (a collective, so before the main-process test)
        progress.loss_sum = accelerator.reduce(loss_sum, "mean").item() if progress.batch else 0.0
        progress.loss_count = loss_count if progress.batch else 0
        if accelerator.is_main_process:
            states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if accelerator.scaler is not None:
                states["scaler"] = accelerator.scaler.state_dict()
            checkpoint.save(ckpt_dir, progress.global_step, plain_net.state_dict(), states,
                            progress, recipe.run.keep)
        accelerator.wait_for_everyone()

    def stop_early() -> bool:
        return t.max_steps is not None and progress.global_step >= t.max_steps

    while progress.epoch < t.epochs and not stop_early():
        epoch = progress.epoch
        splits.train.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, progress.batch) \
            if progress.batch else train_loader
        net.train()
        bar = tqdm(batches, total=len(train_loader), initial=progress.batch,
                   desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                   # None lets tqdm hide itself when stderr is not a terminal (CI logs)
                   disable=None if accelerator.is_main_process and recipe.run.progress else True)
        loss_sum = torch.full((), progress.loss_sum if progress.batch else 0.0,
                              device=accelerator.device)
        loss_count = progress.loss_count if progress.batch else 0
        for images, labels in bar:
            torch.manual_seed(step_seed(recipe.seed, epoch, progress.batch,
                                        accelerator.process_index))
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(net):
                with accelerator.autocast():
                    logits = net(images)
                out = objective(logits, labels)
                loss = out.loss * plain_net.loss_weight
                if not torch.isfinite(loss):
                    accelerator.set_trigger()
                if accelerator.check_trigger():
                    raise TrainingStopped(
                        f"non-finite loss at epoch {epoch + 1}, batch {progress.batch + 1}; "
                        f"stopped every process; the last good checkpoint is kept in {ckpt_dir}")
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip:
                    accelerator.clip_grad_norm_(net.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            loss_sum += loss.detach()
            loss_count += 1
            if accelerator.sync_gradients:
                scheduler.step()
                progress.global_step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                every = recipe.run.checkpoint_every
                if (every and progress.global_step % every == 0) or stop_early():
                    save_checkpoint()
                if stop_early():
                    break
        if stop_early() and progress.batch < len(train_loader):
            break
        record = {
            "epoch": epoch + 1,
            "step": progress.global_step,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": accelerator.reduce(loss_sum, "mean").item() / max(loss_count, 1),
            "holdout": evaluate(net, holdout_loader, accelerator),
            "test": evaluate(net, test_loader, accelerator),
        }
        progress.history.append(record)
        progress.epoch, progress.batch = epoch + 1, 0
        if recipe.run.log_with:
            accelerator.log(reporting.flat_scalars(record), step=progress.global_step)
        save_checkpoint()
        if accelerator.is_main_process:
            # Rewritten from the checkpointed history, so a crash never leaves a duplicate epoch.
            reporting.write_jsonl(run_dir / "metrics.jsonl", progress.history)
            h = reporting.headline(record)
            accelerator.print(f"epoch {epoch + 1}/{t.epochs}: loss {record['train_loss']:.4f}  "
                              f"test acc head0 {h['head0_test_acc']:.4f}  best head "
                              f"{h['best_head']} {h['best_head_test_acc']:.4f}  ensemble "
                              f"{h['ensemble_test_acc']:.4f}")

    if accelerator.is_main_process and progress.history:
        final = progress.history[-1]
        (run_dir / "summary.json").write_text(json.dumps(
            {**reporting.headline(final), "final": final, "num_processes": accelerator.num_processes},
            indent=1))
        reporting.plot_history(progress.history, run_dir / "accuracy.png", run_dir.name)
        accelerator.print(reporting.summary_table(final))
    accelerator.end_training()
    return run_dir


def history_of(run_dir: Path) -> list[dict[str, Any]]:
    """Epoch records of a run, from its latest checkpoint (what export and reports read)."""
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        return []
    return json.loads((latest / "state.json").read_text())["history"]


__all__ = ["TrainingStopped", "build_net", "history_of", "lr_factor", "run_directory",
           "step_seed", "train"]
