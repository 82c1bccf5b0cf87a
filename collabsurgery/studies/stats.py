"""Paired differences between rows over seeds: the mean, a Student t interval and a verdict.

A row and its baseline row are trained on the same seeds, so they are compared seed by seed: the
differences ``d_i = ours_i - baseline_i`` of test error over the ``n`` seeds finished in both,
their mean ``d``, and the 95% interval ``d ± t(0.975, n-1) * s / sqrt(n)`` (``s``: the sample std
of the ``d_i``; Student's t, as the ``d_i`` are few and their spread is estimated). The verdict
compares the interval with the paper's difference ``D`` (its row minus its baseline):

- ``agrees``: the interval excludes 0 and has the sign of ``D``;
- ``disagrees``: the interval excludes 0 with the opposite sign, or ``|D|`` is below
  :data:`PAPER_TIE` points (the paper saw no difference) while ours is resolved;
- ``not resolved``: the interval contains 0, or there are fewer than 2 pairs;
- with no paper number, ``resolved`` or ``not resolved``.

A verdict never comes from a mean alone: without an interval there is none.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from collabsurgery.studies.spec import Row

LEVEL = 0.95
#: a paper difference below this, in points of test error, says "no difference"
PAPER_TIE = 0.1
AGREES, DISAGREES, RESOLVED, NOT_RESOLVED = "agrees", "disagrees", "resolved", "not resolved"


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The Student t interval of the mean of ``diffs`` at ``level``; None for fewer than 2."""
    n = len(diffs)
    if n < 2:
        return None
    from scipy.stats import t as student_t  # imported here: scipy takes seconds to import

    mean = statistics.fmean(diffs)
    quantile = float(student_t.ppf((1 + level) / 2, n - 1))
    half = quantile * statistics.stdev(diffs) / math.sqrt(n)
    return mean - half, mean + half


def verdict(interval: Sequence[float] | None, paper_diff: float | None) -> str:
    """What ``interval`` (ours, or None) says about the paper's difference (module docstring)."""
    if interval is None or interval[0] <= 0 <= interval[1]:
        return NOT_RESOLVED
    if paper_diff is None:
        return RESOLVED
    if abs(paper_diff) < PAPER_TIE:
        return DISAGREES
    return AGREES if (interval[0] > 0) == (paper_diff > 0) else DISAGREES


def paired_difference(ours: dict[int, float], theirs: dict[int, float],
                      paper_diff: float | None) -> dict[str, Any]:
    """``ours`` minus ``theirs`` (test error % by seed) over the seeds in both: ``pairs``,
    ``diff`` (the mean), ``ci`` (the 95% interval), ``paper_diff`` and ``verdict``."""
    diffs = [ours[s] - theirs[s] for s in sorted(ours) if s in theirs]
    interval = t_interval(diffs)
    return {"pairs": len(diffs), "diff": statistics.fmean(diffs) if diffs else None,
            "ci": None if interval is None else list(interval), "paper_diff": paper_diff,
            "verdict": verdict(interval, paper_diff)}


def _paper_diff(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else ours - theirs


def add_differences(rows: Sequence[Row], results: list[dict[str, Any]],
                    baseline: str | None) -> None:
    """Add the paired differences to a study's per-row ``results`` (in the order of ``rows``).

    Every row gets ``difference``: head 0 against its own baseline row (``Row.baseline``, else
    the study's ``baseline``; None for a baseline row, or without one); every cell of a column with a baseline row gets that row's ``baseline``
    key and the fields of :func:`paired_difference` (not the baseline's own cell).
    """
    by_key = {r["key"]: r for r in results}
    for row, r in zip(rows, results):
        r["difference"] = None
        base = by_key.get(row.baseline or baseline)
        if base is not None and r is not base:
            papers = [None if x["paper"] is None else x["paper"][0] for x in (r, base)]
            r["difference"] = {"baseline": base["key"], **paired_difference(
                {run["seed"]: run["head0_err"] for run in r["runs"]},
                {run["seed"]: run["head0_err"] for run in base["runs"]}, _paper_diff(*papers))}
    bases = {c.column: r for row, r in zip(rows, results) for c in row.cells if c.baseline}
    for r in results:
        for column, cell in r.get("columns", {}).items():
            base = bases.get(column)
            if base is None or base is r:
                continue
            cell.update(baseline=base["key"], **paired_difference(
                {run["seed"]: run["columns"][column] for run in r["runs"]},
                {run["seed"]: run["columns"][column] for run in base["runs"]},
                _paper_diff(cell["paper"], base["columns"][column]["paper"])))


def verdicts(results: Sequence[dict[str, Any]]) -> list[str]:
    """Every verdict in a study's per-row results: rows against the baseline row, then cells
    against their column's baseline row."""
    found = [r["difference"]["verdict"] for r in results if r.get("difference")]
    return found + [c["verdict"] for r in results for c in r.get("columns", {}).values()
                    if "verdict" in c]
