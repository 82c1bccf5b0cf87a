"""A study's numbers, read from its runs' files only: per run, per row, and paired differences.

Each finished run's ``summary.json`` (the engine's last-epoch metrics) gives the test error,
``100 * (1 - accuracy)``, of head 0, of the best head on hold-out and of the ensemble; a row's
:class:`~.spec.Cell` reads one head (an index, ``best`` on hold-out, or ``last``), at the last
epoch or at the epoch chosen on the hold-out split (from ``metrics.jsonl``); an
:class:`~.spec.Extra` reads any number of the summary. Rows get the mean and sample std over
seeds, and the paired differences of :mod:`.stats`.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collabsurgery.config.recipe import Recipe
from collabsurgery.studies.costs import row_cost_key
from collabsurgery.studies.spec import Cell, Extra, Row
from collabsurgery.studies.stats import add_differences
from collabsurgery.studies.store import read_json, run_name

#: (results key prefix, summary.json field, words) of the errors every run reports
METRICS = (("head0", "head0_test_acc", "head 0"),
           ("best", "best_head_test_acc", "best head on hold-out"),
           ("ensemble", "ensemble_test_acc", "ensemble"))


def head_error(summary: dict[str, Any], head: str, weights: str = "live") -> float:
    """Test error % of the head that ``head`` selects in a run's ``summary.json``; ``weights``
    "ema": of the EMA weights (``best``: their best head on hold-out)."""
    final = summary["final"] if weights == "live" else summary["final"]["ema"]
    accs = final["test"]["head_acc"]
    index = {"best": final["holdout"]["best_head"], "last": len(accs) - 1}.get(head)
    return 100 * (1 - accs[int(head) if index is None else index])


def holdout_epoch_error(history: Sequence[dict[str, Any]], head: int) -> tuple[float, int]:
    """Test error % of ``head`` at the epoch where its hold-out accuracy was highest (the
    latest such epoch on a tie), and that epoch: the epoch chosen on the hold-out split, where a
    paper that reports its lowest test error over all epochs chooses on the test set."""
    if not history or "holdout" not in history[0]:
        raise ValueError("selecting an epoch on the hold-out split needs a hold-out split "
                         "(data.holdout_fraction > 0)")
    chosen = max(history, key=lambda e: (e["holdout"]["head_acc"][head], e["epoch"]))
    return 100 * (1 - chosen["test"]["head_acc"][head]), chosen["epoch"]


def cell_error(cell: Cell, summary: dict[str, Any], history: Sequence[dict[str, Any]]) -> float:
    """The test error % a cell reads from a run: its summary, or its per-epoch history."""
    if cell.epoch == "holdout":
        return holdout_epoch_error(history, int(cell.head))[0]
    return head_error(summary, cell.head, cell.weights)


def summary_value(summary: dict[str, Any], path: str) -> float | None:
    """The number at dotted ``path`` of a run's ``summary.json``; None where it is absent."""
    value: Any = summary
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return None if value is None else float(value)


def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch metrics (``metrics.jsonl``)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _read_run(run_dir: Path, row: Row, seed: int, extras: Sequence[Extra],
              timings: dict[str, float]) -> dict[str, Any]:
    """One finished run's numbers (its directory has a ``summary.json``)."""
    s = json.loads((run_dir / "summary.json").read_text())
    run = {"run": run_dir.name, "seed": seed, "epoch": s["final"]["epoch"],
           "test_examples": s["final"]["test"]["examples"], "best_head": s["best_head"],
           "wall_s": timings.get(run_dir.name)}
    run.update({f"{m}_err": 100 * (1 - s[field]) for m, field, _ in METRICS})
    if row.cells:
        history = _read_history(run_dir) if any(c.epoch == "holdout" for c in row.cells) else []
        run["columns"] = {c.column: cell_error(c, s, history) for c in row.cells}
    run.update({e.key: summary_value(s, e.path) for e in extras})
    return run


def collect(study_dir: Path, rows: Sequence[Row], seeds: int,
            recipes: dict[str, Sequence[Recipe]], extras: Sequence[Extra] = (),
            baseline: str | None = None) -> list[dict[str, Any]]:
    """Per row: every finished run's errors (from summary.json), and the ``extras`` numbers
    (None in a run without one), and their mean and std (over the runs that have them); the
    paired differences to the ``baseline`` row and to each column's baseline (:mod:`.stats`)."""
    timings = read_json(study_dir / "timings.json", {})
    costs = read_json(study_dir / "costs.json", {})
    out = []
    for row in rows:
        dirs = [(seed, study_dir / "runs" / run_name(row, seed)) for seed in range(seeds)]
        runs = [_read_run(d, row, seed, extras, timings) for seed, d in dirs
                if (d / "summary.json").is_file()]
        entry: dict[str, Any] = {"key": row.key, "label": row.label, "series": row.series,
                                 "x": row.x, "paper": row.paper, "runs": runs,
                                 "cost": costs.get(row_cost_key(recipes[row.key]) or "")}
        for m, _, _ in METRICS:
            entry[f"{m}_err"] = _mean_std([r[f"{m}_err"] for r in runs])
        for e in extras:
            entry[e.key] = _mean_std([r[e.key] for r in runs if r[e.key] is not None])
        if row.cells:
            entry["columns"] = {c.column: {"head": c.head, "paper": c.paper, "err": _mean_std(
                [r["columns"][c.column] for r in runs])} for c in row.cells}
        out.append(entry)
    add_differences(rows, out, baseline)
    return out
