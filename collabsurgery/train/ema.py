"""An exponential moving average (EMA) of the training graph's weights: timm's ``ModelEmaV3``.

Recipe keys (``train.``): ``ema_decay`` (null: no EMA), ``ema_warmup`` (``use_warmup``: the
decay ramps up as ``1 - (1 + s)^(-2/3)``, capped at ``ema_decay``) and ``ema_select`` (the run's
best head and its default export are the EMA weights').

The EMA covers every tensor of the graph's ``state_dict()`` (parameters and buffers; integer
buffers are copied), not what the objective owns, so its state is a plain graph state dict: it
loads into a rebuilt graph as ``model.safetensors``'s graph part does, and exports alike. It is
updated after every optimizer update with ``step`` = the run's optimizer steps so far (1 after
the first), as timm's ``train.py`` passes ``num_updates``: ``ModelEmaV3.get_decay`` gives decay 0
at step 1 (the EMA starts as the weights after the first update), then ``ema_decay`` or the
warm-up's value at ``s = step - 1``. The decay depends on nothing but the step, so a resumed run
that loads the checkpointed EMA continues bit-identically.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from collabsurgery.config.recipe import TrainConfig
from collabsurgery.errors import UserError
from collabsurgery.graphs import TrainingGraph
from collabsurgery.rundir import metrics
from collabsurgery.train.evaluate import evaluate


def check(train: TrainConfig) -> None:
    """The EMA keys of a recipe agree (before anything is built or written)."""
    if train.ema_select and train.ema_decay is None:
        raise UserError("recipe key 'train.ema_select' is true but train.ema_decay is null (no "
                        "EMA is kept); valid: set train.ema_decay (e.g. 0.999) or "
                        "train.ema_select=false")


def check_temporal_mean(train: TrainConfig, method: str) -> None:
    """An objective that distils from the temporal mean of the weights (``wants_temporal_mean``:
    PCL) gets that EMA and exports the EMA weights' best head: refused in one line otherwise,
    naming both keys (nothing is set behind the recipe's back)."""
    if train.ema_decay is None or not train.ema_select:
        decay = "null" if train.ema_decay is None else train.ema_decay
        given = (f"train.ema_decay={decay}, train.ema_select="
                 f"{str(train.ema_select).lower()}")
        raise UserError(f"objective '{method}' distils from the temporal mean (EMA) of the "
                        f"weights and exports the EMA weights' best head, but {given}; set "
                        "train.ema_decay (PCL's code: 0.999) and train.ema_select=true")


def build(graph: TrainingGraph, train: TrainConfig) -> ModelEmaV3 | None:
    """The EMA of ``graph`` (a copy on its device, in eval mode), or None when
    ``train.ema_decay`` is null. Build it once the graph is on its device."""
    if train.ema_decay is None:
        return None
    ema = ModelEmaV3(graph, decay=train.ema_decay, use_warmup=train.ema_warmup)
    ema.module.requires_grad_(False)
    return ema


@torch.no_grad()
def update(ema: ModelEmaV3, graph: TrainingGraph, step: int) -> None:
    """Move the EMA toward ``graph``'s weights after optimizer step ``step`` (1-based)."""
    ema.update(graph, step=step)


def state(ema: ModelEmaV3) -> dict[str, torch.Tensor]:
    """The EMA weights as the graph's state dict (what ``ema.safetensors`` holds)."""
    return ema.module.state_dict()


def load(ema: ModelEmaV3, weights: dict[str, torch.Tensor]) -> None:
    """Load checkpointed EMA weights (strict: every key of the graph, nothing else)."""
    ema.module.load_state_dict(weights, strict=True)


def evaluate_ema(ema: ModelEmaV3, graph: TrainingGraph, holdout: DataLoader, test: DataLoader,
                 accelerator: Accelerator) -> dict[str, dict]:
    """The EMA weights' records on hold-out and test (as :func:`evaluate` gives the live ones'),
    running the execution modes the live graph chose."""
    ema.module.replay_execution_choices(graph.execution_choices())
    return {"holdout": evaluate(ema.module, holdout, accelerator),
            "test": evaluate(ema.module, test, accelerator)}


def epoch_line(record: dict) -> str:
    """The EMA weights' test accuracies of an epoch record, one line (below the live ones')."""
    h = metrics.headline(record, ema=True)
    return (f"  EMA weights: test acc head0 {h['head0_test_acc']:.4f}  best head "
            f"{h['best_head']} {h['best_head_test_acc']:.4f}  ensemble "
            f"{h['ensemble_test_acc']:.4f}")


__all__ = ["build", "check", "check_temporal_mean", "epoch_line", "evaluate_ema", "load",
           "state", "update"]
