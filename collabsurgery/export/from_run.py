"""Find what to export: a training graph file, or the last checkpoint of a training run.

A run trained with ``train.ema_decay`` holds two sets of weights of its graph: the live ones
(``model.safetensors``) and their exponential moving average (``ema.safetensors``). ``weights``
picks one (``"live"`` or ``"ema"``); left out, :func:`run_weights` takes the run's own choice
(``train.ema_select``). The EMA weights have their own hold-out records, so their own best head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from collabsurgery.errors import UserError, warn
from collabsurgery.export import export
from collabsurgery.export.artifact import check_format, export_head
from collabsurgery.export.deploy import Verified, check_target
from collabsurgery.graphs import TrainingGraph, rebuild
from collabsurgery.graphs.saving import config_from_json, load_graph
from collabsurgery.rundir import checkpoint


def parse_head(text: str, net: TrainingGraph) -> int | None:
    """``"best"`` -> None; an index in range, or the architecture of exactly one head (a peer
    group's ``resnet18``) -> its index; anything else a UserError naming what is valid."""
    if text == "best":
        return None
    names = [net.head_spec(h).qualified_name for h in range(net.num_heads)]
    if text in names:
        if names.count(text) > 1:
            raise UserError(f"head '{text}' names {names.count(text)} heads; give an index: "
                            + ", ".join(f"{h}={n}" for h, n in enumerate(names)))
        return names.index(text)
    try:
        head = int(text)
    except ValueError:
        head = -1
    if not 0 <= head < net.num_heads:
        by_name = f" or a head's architecture ({', '.join(dict.fromkeys(names))})" \
            if len(set(names)) > 1 else ""
        raise UserError(f"head '{text}' out of range; valid: best or 0..{net.num_heads - 1}"
                        f"{by_name}")
    return head


WEIGHTS = ("live", "ema")


def _recipe_of(run_dir: Path) -> dict[str, Any]:
    """A run's ``recipe.yaml`` as plain data ({} if absent or not a mapping)."""
    recipe_file = run_dir / "recipe.yaml"
    raw = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    return raw if isinstance(raw, dict) else {}


def run_weights(run_dir: Path, asked: str | None = None) -> str:
    """``asked`` (``"live"`` or ``"ema"``), else the run's choice: ``"ema"`` when its recipe
    sets ``train.ema_select``, otherwise ``"live"``."""
    if asked is not None:
        if asked not in WEIGHTS:
            raise UserError(f"weights '{asked}' unknown; valid: {', '.join(WEIGHTS)}")
        return asked
    train = _recipe_of(run_dir).get("train")
    return "ema" if isinstance(train, dict) and train.get("ema_select") is True else "live"


def _record(history_entry: dict, weights: str) -> dict:
    """An epoch record's hold-out/test records of ``weights`` (the EMA's under ``"ema"``)."""
    return history_entry["ema"] if weights == "ema" else history_entry


def load_run(run_dir: Path, weights: str = "live") -> tuple[TrainingGraph, list[dict]]:
    """The training graph of a run at its newest intact checkpoint (without what the objective
    owns), with its live or EMA ``weights``, and its epoch records. Damaged newer checkpoints
    are reported on stderr and skipped; reading is safe while the run is still training (see
    :func:`checkpoint.load_latest`). ``"ema"`` of a run without EMA weights: UserError."""
    if not (run_dir / "graph.json").is_file():
        raise UserError(f"{run_dir} is not a training run (no graph.json); valid: a run "
                        "directory written by collabsurgery train, or a training graph file")
    found = checkpoint.load_latest(run_dir / "checkpoints", warn=warn)
    if found is None:
        raise UserError(f"{run_dir} has no complete checkpoint yet")
    _, (model_state, states, progress) = found
    if weights == "ema":
        if "ema" not in states:
            raise UserError(f"{run_dir} has no EMA weights (it was trained with "
                            "train.ema_decay: null); valid: its live weights (leave out --ema), "
                            "or a run trained with train.ema_decay set")
        graph_state = states["ema"]
    else:
        graph_state, _ = checkpoint.split_state(model_state)
    net = rebuild(config_from_json((run_dir / "graph.json").read_text()))
    net.load_state_dict(graph_state, strict=True)
    return net.eval(), progress.history


def best_head(run_dir: Path, history: list[dict], num_heads: int, weights: str = "live") -> int:
    """The run's best head on hold-out at its last evaluated epoch, of its live or EMA
    ``weights``; UserError before one (a run with one head: that head)."""
    if num_heads == 1:
        return 0
    if not history:
        raise UserError(f"{run_dir} has no evaluated epoch yet, so no best head; "
                        f"give a head index 0..{num_heads - 1}")
    if weights == "ema" and "ema" not in history[-1]:
        raise UserError(f"{run_dir} has no hold-out record of EMA weights, so no best EMA head; "
                        f"give a head index 0..{num_heads - 1}")
    return _record(history[-1], weights)["holdout"]["best_head"]


def default_head(run_dir: Path, history: list[dict], num_heads: int,
                 weights: str = "live") -> int:
    """The head a run's method keeps for inference: its objective's ``default_export``
    (OKDDip: the leader, the last head), else the best head on hold-out (of ``weights``)."""
    from collabsurgery.objectives import OBJECTIVES

    section = _recipe_of(run_dir).get("objective")
    name = section.get("name") if isinstance(section, dict) else None
    objective = OBJECTIVES.get(name) if isinstance(name, str) else None
    if objective is not None and objective.default_export == "last":
        return num_heads - 1
    return best_head(run_dir, history, num_heads, weights)


def select_head(run_dir: Path, head_text: str | None, net: TrainingGraph,
                history: list[dict], weights: str = "live") -> int:
    """The head ``head_text`` names in a run (an index, an architecture or ``best``: of the live
    or EMA ``weights``); ``None``: the head the run's method keeps (:func:`default_head`)."""
    if head_text is None:
        return default_head(run_dir, history, net.num_heads, weights)
    head = parse_head(head_text, net)
    return best_head(run_dir, history, net.num_heads, weights) if head is None else head


def _run_head(run_dir: Path, head_text: str | None, weights: str
              ) -> tuple[TrainingGraph, int, dict[str, Any]]:
    """A run's graph, the head ``head_text`` names and the export's metadata (recipe, metrics
    of that head, run name, EMA weights)."""
    net, history = load_run(run_dir, weights)
    head = select_head(run_dir, head_text, net, history, weights)
    metrics = {}
    if history and (weights == "live" or "ema" in history[-1]):
        last, records = history[-1], _record(history[-1], weights)
        metrics = {"epoch": last["epoch"], "holdout_acc": records["holdout"]["head_acc"][head],
                   "test_acc": records["test"]["head_acc"][head],
                   "ensemble_test_acc": records["test"]["ensemble_acc"]}
    recipe_file = run_dir / "recipe.yaml"
    extra = {"recipe": recipe_file.read_text() if recipe_file.is_file() else "",
             "metrics": metrics, "run": run_dir.name}
    if weights == "ema":
        extra["weights"] = "ema"
    return net, head, extra


def _source_head(source: Path, head_text: str | None, weights: str | None
                 ) -> tuple[TrainingGraph, int, dict[str, Any] | None]:
    """The graph, head and export metadata of a run directory or a graph file."""
    if source.is_dir():
        return _run_head(source, head_text, run_weights(source, weights))
    if not source.is_file():
        raise UserError(f"no such file or run directory: {source}")
    if weights == "ema":
        raise UserError(f"{source} is a training graph file, which holds one set of weights; "
                        "EMA weights (--ema) come from a training run directory trained with "
                        "train.ema_decay set")
    net = load_graph(source)
    head = parse_head(head_text or "best", net)
    if head is None:
        raise UserError("head 'best' needs a training run with hold-out metrics; "
                        f"give a head index 0..{net.num_heads - 1}")
    return net, head, None


def export_from_source(source: Path, head_text: str | None, output: Path,
                       weights: str | None = None) -> tuple[Path, int]:
    """Export ``head_text`` of a run directory or graph file to ``output``; (path, head).
    ``None``: a run's :func:`default_head`; a graph file needs an index. ``weights``: a run's
    ``"live"`` or ``"ema"`` weights; None: the run's choice (:func:`run_weights`)."""
    net, head, extra = _source_head(source, head_text, weights)
    return export(net, head, output, extra_metadata=extra), head


def deploy_from_source(source: Path, head_text: str | None, output: Path, format: str,
                       weights: str | None = None, *, opset: int | None = None,
                       features_only: bool = False) -> tuple[Verified, int]:
    """As :func:`export_from_source`, as a verified ``onnx`` or ``torch-export`` artifact
    (:func:`collabsurgery.export.artifact.export_head`); (what was verified, head)."""
    check_format(format, opset, features_only)
    check_target(format, output)  # before loading the run
    net, head, extra = _source_head(source, head_text, weights)
    return export_head(net, head, output, format, extra_metadata=extra, opset=opset,
                       features_only=features_only), head
