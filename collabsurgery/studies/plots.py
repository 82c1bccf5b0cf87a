"""A study's plots: test error per row (bars), and against the study's x (curves)."""
from __future__ import annotations

from pathlib import Path

from collabsurgery.rundir.metrics import pyplot, save_figure
from collabsurgery.studies.results import METRICS
from collabsurgery.studies.spec import Budget, Study


def plot_bars(study: Study, plan: Budget, results: list[dict], path: Path) -> Path | None:
    """Test error per row: head 0, best head and ensemble, error bars = std over seeds."""
    shown = [r for r in results if r["runs"]]
    if not shown:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shown) + 2), 4.5))
    width = 0.8 / len(METRICS)
    for j, (m, _, label) in enumerate(METRICS):
        xs = [i + (j - 1) * width for i in range(len(shown))]
        ax.bar(xs, [r[f"{m}_err"]["mean"] for r in shown], width,
               yerr=[r[f"{m}_err"]["std"] or 0 for r in shown], capsize=3, label=label)
    if plan.needs_source:  # same data as the paper: its head-0 numbers are comparable
        paper = [(i, r["paper"]) for i, r in enumerate(shown) if r["paper"]]
        ax.scatter([i - width for i, _ in paper], [p[0] for _, p in paper], marker="x",
                   color="black", zorder=3, label="paper (head 0)")
    ax.set_xticks(range(len(shown)), [r["key"] for r in shown], rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="test error (%)", title=f"{study.name} ({plan.name} budget)")
    return save_figure(fig, ax, path, grid_axis="y")


def plot_curves(study: Study, budget: str, results: list[dict], path: Path) -> Path | None:
    """Test error against the study's x (e.g. label noise), one curve per setup."""
    series: dict[str, list[dict]] = {}
    for r in results:
        if r["runs"] and r["series"] is not None:
            series.setdefault(r["series"], []).append(r)
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [r["x"] for rows in series.values() for r in rows]
    dodge = 0.01 * ((max(xs) - min(xs)) or 1)  # keep the error bars of the curves apart
    for i, (name, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r["x"])
        color, shift = f"C{i}", dodge * (i - (len(series) - 1) / 2)
        one_head = all(run["ensemble_err"] == run["head0_err"] and run["best_head"] == 0
                       for r in rows for run in r["runs"])
        for m, style in (("head0", "-"), ("ensemble", ":"))[:1 if one_head else 2]:
            ax.errorbar([r["x"] + shift for r in rows], [r[f"{m}_err"]["mean"] for r in rows],
                        yerr=[r[f"{m}_err"]["std"] or 0 for r in rows], fmt="o" + style,
                        color=color, capsize=3, ms=4,
                        label=f"{name} ({'head 0' if m == 'head0' else 'ensemble'})")
    ax.set(xlabel=study.x_label, ylabel="test error (%)", title=f"{study.name} ({budget} budget)")
    return save_figure(fig, ax, path, legend_size=7)
