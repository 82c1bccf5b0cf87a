"""Find what to export: a training graph file, or the last checkpoint of a training run."""
from __future__ import annotations

from pathlib import Path

import yaml

from collabsurgery.errors import UserError, warn
from collabsurgery.export import export
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


def load_run(run_dir: Path) -> tuple[TrainingGraph, list[dict]]:
    """The training graph of a run at its newest intact checkpoint (without what the objective
    owns), and its epoch records. Damaged newer checkpoints are reported on stderr and skipped;
    reading is safe while the run is still training (see :func:`checkpoint.load_latest`)."""
    if not (run_dir / "graph.json").is_file():
        raise UserError(f"{run_dir} is not a training run (no graph.json); valid: a run "
                        "directory written by collabsurgery train, or a training graph file")
    found = checkpoint.load_latest(run_dir / "checkpoints", warn=warn)
    if found is None:
        raise UserError(f"{run_dir} has no complete checkpoint yet")
    _, (model_state, _, progress) = found
    net = rebuild(config_from_json((run_dir / "graph.json").read_text()))
    graph_state, _ = checkpoint.split_state(model_state)
    net.load_state_dict(graph_state, strict=True)
    return net.eval(), progress.history


def best_head(run_dir: Path, history: list[dict], num_heads: int) -> int:
    """The run's best head on hold-out at its last evaluated epoch; UserError before one."""
    if not history:
        raise UserError(f"{run_dir} has no evaluated epoch yet, so no best head; "
                        f"give a head index 0..{num_heads - 1}")
    return history[-1]["holdout"]["best_head"]


def default_head(run_dir: Path, history: list[dict], num_heads: int) -> int:
    """The head a run's method keeps for inference: its objective's ``default_export``
    (OKDDip: the leader, the last head), else the best head on hold-out."""
    from collabsurgery.objectives import OBJECTIVES

    recipe_file = run_dir / "recipe.yaml"
    raw = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    name = (raw or {}).get("objective", {}).get("name") if isinstance(raw, dict) else None
    objective = OBJECTIVES.get(name) if isinstance(name, str) else None
    if objective is not None and objective.default_export == "last":
        return num_heads - 1
    return best_head(run_dir, history, num_heads)


def select_head(run_dir: Path, head_text: str | None, net: TrainingGraph,
                history: list[dict]) -> int:
    """The head ``head_text`` names in a run (an index, an architecture or ``best``); ``None``:
    the head the run's method keeps (:func:`default_head`)."""
    if head_text is None:
        return default_head(run_dir, history, net.num_heads)
    head = parse_head(head_text, net)
    return best_head(run_dir, history, net.num_heads) if head is None else head


def _export_run(run_dir: Path, head_text: str | None, output: Path) -> tuple[Path, int]:
    net, history = load_run(run_dir)
    head = select_head(run_dir, head_text, net, history)
    metrics = {}
    if history:
        last = history[-1]
        metrics = {"epoch": last["epoch"], "holdout_acc": last["holdout"]["head_acc"][head],
                   "test_acc": last["test"]["head_acc"][head],
                   "ensemble_test_acc": last["test"]["ensemble_acc"]}
    recipe_file = run_dir / "recipe.yaml"
    extra = {"recipe": recipe_file.read_text() if recipe_file.is_file() else "",
             "metrics": metrics, "run": run_dir.name}
    return export(net, head, output, extra_metadata=extra), head


def export_from_source(source: Path, head_text: str | None, output: Path) -> tuple[Path, int]:
    """Export ``head_text`` of a run directory or graph file to ``output``; (path, head).
    ``None``: a run's :func:`default_head`; a graph file needs an index."""
    if source.is_dir():
        return _export_run(source, head_text, output)
    if not source.is_file():
        raise UserError(f"no such file or run directory: {source}")
    net = load_graph(source)
    head = parse_head(head_text or "best", net)
    if head is None:
        raise UserError("head 'best' needs a training run with hold-out metrics; "
                        f"give a head index 0..{net.num_heads - 1}")
    return export(net, head, output), head
