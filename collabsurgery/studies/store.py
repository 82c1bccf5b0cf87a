"""Where a study keeps its files, and how its JSON files are read and (atomically) written.

A study lives in ``<root>/<study>-<budget>/``:

    runs/<row>-seed<k>/   ordinary run directories (recipe.yaml, metrics.jsonl, summary.json, ...)
    study.json            every call: command, code version (git), runs trained or stopped
    timings.json          wall seconds this machine spent training each run
    costs.json            time / memory / FLOP ratios of each training graph (bench, once a graph)
    results.json, report.md, errors.png (and curves.png)   rewritten at the end of every call
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from collabsurgery.common import atomic
from collabsurgery.studies.spec import Budget, Row, Study


def study_directory(study: Study, budget: Budget, root: str | Path) -> Path:
    """The directory of ``study`` on ``budget`` under ``root``."""
    return Path(root) / f"{study.name}-{budget.name}"


def run_name(row: Row, seed: int) -> str:
    """The run directory name of ``row`` at ``seed`` (under the study's ``runs/``)."""
    return f"{row.key}-seed{seed}"


def read_json(path: Path, default: Any) -> Any:
    """The JSON value in ``path``, or ``default`` when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` to ``path`` atomically, so a reader never sees half."""
    atomic.write_text(path, json.dumps(value, indent=1, sort_keys=True))
