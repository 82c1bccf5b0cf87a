"""Optimizer and learning-rate schedule from timm's factories, by timm's names.

``make_optimizer`` is ``timm.optim.create_optimizer_v2`` over every parameter of the graph and
the objective (so modules an objective owns train too); ``make_schedule`` is
``timm.scheduler.create_scheduler_v2`` stepped per optimizer update (``plateau``: per epoch, on
the hold-out accuracy). A recipe's ``train`` section maps to them as timm's ``train.py`` flags
do: ``optimizer`` is ``--opt``, ``gamma`` is ``--decay-rate``, ``milestones`` is
``--decay-milestones``; the warm-up is a prefix (``warmup_prefix=True``), so the schedule's
span is ``epochs - warmup_epochs`` as it always was here.

Curves: with no warm-up, ``cosine``, ``multistep`` and ``constant`` give exactly the learning
rates of collabsurgery before it used timm (0.5 (1 + cos(pi s / S)) and lr x gamma^k). timm's
warm-up starts at ``warmup_lr`` on update 0 and reaches ``lr`` on update N = warm-up updates;
the old ramp reached it one update earlier ((s + 1) / N); from update N on the curves agree.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import timm.optim
import torch
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from collabsurgery.errors import UserError


def make_optimizer(module: torch.nn.Module, train: Any) -> torch.optim.Optimizer:
    """``train.optimizer`` over every parameter of ``module``, with timm's parameter groups
    (no weight decay on norm weights and biases unless ``train.decay_norm_and_bias``)."""
    name = train.optimizer.lower()
    info = timm.optim.get_optimizer_info(name.split("_")[-1])
    kwargs = dict(train.optimizer_args)
    if "nesterov" in (info.defaults or {}):  # torch refuses Nesterov without momentum
        kwargs.setdefault("nesterov", train.nesterov and train.momentum > 0)
    try:
        return timm.optim.create_optimizer_v2(
            module, name, lr=train.lr, weight_decay=train.weight_decay, momentum=train.momentum,
            filter_bias_and_bn=not train.decay_norm_and_bias, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"recipe key 'train.optimizer_args' {dict(train.optimizer_args)} does "
                        f"not fit optimizer '{name}' ({err})") from None


@dataclass
class Schedule:
    """A timm scheduler and when to step it: :meth:`after_update` after every optimizer update,
    :meth:`after_epoch` after every evaluated epoch (``plateau`` only, with the metric)."""

    scheduler: Scheduler
    per_epoch: bool

    def after_update(self, updates: int) -> None:
        """Set the lr of update ``updates`` (the number of updates taken so far)."""
        if not self.per_epoch:
            self.scheduler.step_update(updates)

    def after_epoch(self, epochs: int, metric: float) -> None:
        """Set the lr of epoch ``epochs`` from the hold-out ``metric`` (higher is better)."""
        if self.per_epoch:
            self.scheduler.step(epochs, metric)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: timm's state, and the plateau counters timm does not keep."""
        state = {"timm": self.scheduler.state_dict()}
        inner = getattr(self.scheduler, "lr_scheduler", None)
        if isinstance(inner, torch.optim.lr_scheduler.ReduceLROnPlateau):
            state["plateau"] = inner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state (or, from a checkpoint written before timm's
        schedulers, a torch ``LambdaLR``'s: continue from its update count)."""
        if "timm" not in state and "last_epoch" in state:
            self.after_update(state["last_epoch"])
            return
        self.scheduler.load_state_dict(state["timm"])
        if "plateau" in state:
            self.scheduler.lr_scheduler.load_state_dict(state["plateau"])


#: create_scheduler_v2 arguments counted in epochs (converted to updates, see make_schedule)
_EPOCH_ARGUMENTS = ("decay_epochs", "cooldown_epochs", "stable_timescale")


def make_schedule(optimizer: torch.optim.Optimizer, train: Any, updates_per_epoch: int
                  ) -> Schedule:
    """``train.schedule`` over ``train.epochs`` (after ``train.warmup_epochs`` of warm-up).

    Per-update schedules are built in whole updates (``updates_per_epoch=1``, every epoch
    count multiplied here), so milestones land exactly: timm applies milestone ``d`` at
    update ``d - 1`` after the warm-up, and ``train.milestones`` are epochs from the start.
    """
    name = train.schedule
    if name == "plateau":  # per epoch on the hold-out accuracy
        per_epoch, unit = True, 1
    else:
        per_epoch, unit = False, updates_per_epoch
    warmup = train.warmup_epochs * unit
    args: dict[str, Any] = dict(
        sched="multistep" if name == "constant" else name,
        num_epochs=max(train.epochs - train.warmup_epochs, 1) * unit,
        decay_milestones=[] if name == "constant" else
        [max(m * unit - warmup + 1, 0) for m in train.milestones],
        decay_rate=train.gamma, min_lr=train.min_lr, warmup_lr=train.warmup_lr,
        warmup_epochs=warmup, warmup_prefix=True, step_on_epochs=per_epoch,
        updates_per_epoch=1)
    if train.decay_epochs is not None:
        args["decay_epochs"] = train.decay_epochs
    args.update(train.scheduler_args)
    for key in _EPOCH_ARGUMENTS:
        if args.get(key) is not None:
            args[key] = args[key] * unit
    with warnings.catch_warnings():  # plateau's deprecation: its counters are checkpointed here
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated")
        try:
            scheduler, _ = create_scheduler_v2(optimizer, **args)
        except (TypeError, ValueError, AssertionError) as err:
            raise UserError(f"recipe key 'train.scheduler_args' {dict(train.scheduler_args)} "
                            f"does not fit schedule '{name}' ({err})") from None
    return Schedule(scheduler, per_epoch)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])
