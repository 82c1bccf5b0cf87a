"""Anytime inference with BYOT's exits (Zhang et al., ICCV 2019, Table 1 / Fig. 5): each shallow
classifier's test accuracy and forward FLOPs, beside the full network's.

An exit's FLOPs are those of the backbone up to its split point (the graph's stages up to it,
``torch.utils.flop_counter.FlopCounterMode`` on one image in eval mode) plus its classifier's;
the full network's are the whole backbone's. A trained run is read with
:func:`run_with_objective` (its graph and its objective's exit classifiers, from the latest
checkpoint); ``collabsurgery evaluate RUN --exits`` prints :func:`format_anytime`.

A truncated backbone at an exit, as a feature extractor of an export, is
:func:`collabsurgery.export.features.load_features` with that level's index:
:func:`exit_features` finds it by the exit's name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.features import load_features
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs import TrainingGraph
from collabsurgery.objectives.self_distillation import SelfDistillationLoss
from collabsurgery.rundir import checkpoint
from collabsurgery.surgery.buffers import preserved_buffers
from collabsurgery.train.engine import build_objective_from

FULL = "output"  # the row of the whole network (its own classifier)


def _flops(module: nn.Module, x: torch.Tensor) -> tuple[int, Any]:
    """(forward FLOPs, output) of ``module`` on ``x``, buffers left as they were."""
    with preserved_buffers(module), FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops(), out


@torch.no_grad()
def exit_flops(graph: TrainingGraph, objective: SelfDistillationLoss) -> dict[str, int]:
    """Forward FLOPs per image of each exit (backbone up to it + its classifier) and of the
    whole network (``"output"``), in eval mode at the graph's input size."""
    was = graph.training, objective.training
    graph.eval(), objective.eval()
    try:
        with graph.reference_execution():
            pieces = graph.cost_pieces(torch.zeros(1, *graph.input_size,
                                                   device=_device(graph)))
            done, at = 0, {}
            for piece in pieces:
                flops, out = _flops(piece.module, piece.input)
                done += flops
                at[piece.name.split("..")[1]] = (done, out)
        result = {}
        for name, classifier in zip(objective.exit_points, objective.classifiers):
            backbone, feature = at[name]
            result[name] = backbone + _flops(classifier, feature.float())[0]
        result[FULL] = at[FULL][0]
        return result
    finally:
        graph.train(was[0]), objective.train(was[1])


@torch.no_grad()
def exit_accuracy(graph: TrainingGraph, objective: SelfDistillationLoss,
                  loader: DataLoader) -> dict[str, float]:
    """Top-1 accuracy of each exit and of the whole network (``"output"``) on ``loader``'s
    ``(images, labels)``, in eval mode."""
    was = graph.training, objective.training
    graph.eval(), objective.eval()
    names = [*objective.exit_points, FULL]
    correct, total = dict.fromkeys(names, 0), 0
    device = _device(graph)
    try:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            out = graph.run(images, wants=objective.wants)
            logits = [z for z, _ in objective.exit_outputs(out.features)] + [out.logits[0]]
            for name, z in zip(names, logits):
                correct[name] += int((z.argmax(-1) == labels).sum())
            total += labels.numel()
    finally:
        graph.train(was[0]), objective.train(was[1])
    return {name: correct[name] / max(total, 1) for name in names}


def anytime(graph: TrainingGraph, objective: SelfDistillationLoss,
            loader: DataLoader) -> list[dict[str, Any]]:
    """One row per exit, then the whole network: ``exit``, ``accuracy``, ``flops`` (per image)
    and ``flops_fraction`` (of the whole network's)."""
    accuracy, flops = exit_accuracy(graph, objective, loader), exit_flops(graph, objective)
    return [{"exit": name, "accuracy": accuracy[name], "flops": flops[name],
             "flops_fraction": flops[name] / flops[FULL]} for name in accuracy]


def format_anytime(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`anytime` as a table a person can read."""
    lines = [f"{'exit':<24} {'test acc':>9} {'MFLOPs/image':>13} {'of full':>8}"]
    for row in rows:
        label = "full network" if row["exit"] == FULL else row["exit"]
        lines.append(f"{label:<24} {row['accuracy']:>9.4f} {row['flops'] / 1e6:>13.2f} "
                     f"{row['flops_fraction']:>8.1%}")
    return "\n".join(lines)


def run_with_objective(run_dir: str | os.PathLike) -> tuple[TrainingGraph, SelfDistillationLoss]:
    """A BYOT run's graph and objective (exit classifiers included) at its latest checkpoint,
    in eval mode; UserError for a run of another objective."""
    run_dir = Path(run_dir)
    graph, _ = load_run(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    objective = build_objective_from(recipe)
    if not isinstance(objective, SelfDistillationLoss):
        raise UserError(f"{run_dir} was trained with objective {recipe.objective.name}, which "
                        "has no exits; valid: a run of objective byot")
    objective.attach(graph)
    _, (model_state, _, _) = checkpoint.load_latest(run_dir / "checkpoints")
    objective.load_state_dict(checkpoint.split_state(model_state)[1], strict=True)
    return graph.eval(), objective.eval()


def exit_features(path: str | os.PathLike, exit: str, **model_kwargs: Any) -> nn.Module:
    """The backbone of export ``path`` truncated at ``exit``, as a feature extractor returning
    ``[feature map at exit]`` (:func:`~collabsurgery.export.features.load_features`: timm's
    ``features_only``, torchvision's ``create_feature_extractor``; both stop at the last level
    asked for). UserError naming the levels when ``exit`` is not one of them."""
    names = list(load_features(path, **model_kwargs).feature_info.module_name())
    if exit not in names:
        raise UserError(f"exit '{exit}' is not a feature level of {path}; valid: "
                        f"{', '.join(names)}")
    return load_features(path, out_indices=[names.index(exit)], **model_kwargs)


def _device(graph: TrainingGraph) -> torch.device:
    return next(graph.parameters(), torch.zeros(0)).device
