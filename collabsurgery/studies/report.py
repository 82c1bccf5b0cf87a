"""A study's ``results.json`` and ``report.md`` (with plots), and the index page of studies.

Every number comes from the runs' files (:mod:`.results`); the paired differences, intervals and
verdicts are :mod:`.stats`'. The text here is the same for every study: what only concerns one
study or method is in its catalog entry (``notes``, ``source``, row labels).
"""
from __future__ import annotations

import os
import shlex
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collabsurgery.config.recipe import Recipe
from collabsurgery.studies.plots import plot_bars, plot_curves
from collabsurgery.studies.results import collect
from collabsurgery.studies.spec import Budget, Row, Study
from collabsurgery.studies.stats import (AGREES, DISAGREES, LEVEL, NOT_RESOLVED, PAPER_TIE,
                                         RESOLVED, verdicts)
from collabsurgery.studies.store import read_json, write_json

_CI = f"[{LEVEL:.0%} CI]"


def _pm(stat: dict[str, float | None], digits: int = 2) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}"
                                           if stat["std"] is not None else "")


def _ratio(cost: dict | None, key: str) -> str:
    return "—" if not cost or cost.get(key) is None else f"{cost[key]:.2f}"


def _difference(d: dict[str, Any], named: bool = False) -> list[str]:
    """Ours ``-0.45 [-0.90, 0.00] (5)`` (no interval with one pair, — with none; ``named``:
    followed by ``vs <baseline row>``), the paper's difference and the verdict."""
    ours = "—"
    if d["diff"] is not None:
        ci = "" if d["ci"] is None else f" [{d['ci'][0] + 0:.2f}, {d['ci'][1] + 0:.2f}]"
        ours = f"{d['diff']:+.2f}{ci} ({d['pairs']})"  # + 0: no "-0.00" for a zero bound
        ours += f" vs {d['baseline']}" if named else ""
    paper = "—" if d["paper_diff"] is None else f"{d['paper_diff']:+.2f}"
    return [ours, paper, d["verdict"]]


def _difference_legend() -> list[str]:
    return [f"Differences, mean {_CI} (pairs): this row's test error minus the baseline row's "
            "on the same seed, averaged over the seeds finished in both (their number in "
            f"brackets), with its {LEVEL:.0%} confidence interval, Student's t over those "
            f"paired differences: mean ± t({(1 + LEVEL) / 2:g}, pairs − 1) · std / √pairs "
            "(no interval with one pair). paper −: the same difference of the paper's numbers. "
            f"Verdict: *{AGREES}*: the interval excludes 0 and has the paper's sign; "
            f"*{DISAGREES}*: it excludes 0 with the opposite sign, or the paper's difference is "
            f"below {PAPER_TIE:g} points while ours is resolved; *{NOT_RESOLVED}*: the interval "
            f"contains 0, or fewer than 2 pairs; without a paper number: *{RESOLVED}* or "
            f"*{NOT_RESOLVED}*. A mean difference alone is never a verdict.", ""]


def verdict_summary(results: Sequence[dict[str, Any]]) -> str:
    """One line on a study's paired differences, e.g. ``3 of 6 differences resolved: 2 agree,
    1 disagrees``."""
    found = verdicts(results)
    if not found:
        return "no paired differences (no baseline row)"
    counts = Counter(found)
    parts = [f"{counts[AGREES]} agree{'s' * (counts[AGREES] == 1)}",
             f"{counts[DISAGREES]} disagree{'s' * (counts[DISAGREES] == 1)}",
             f"{counts[RESOLVED]} without a paper number"]
    numbers = (counts[AGREES], counts[DISAGREES], counts[RESOLVED])
    shown = [part for part, n in zip(parts, numbers) if n]
    resolved = len(found) - counts[NOT_RESOLVED]
    return (f"{resolved} of {len(found)} difference{'s' * (len(found) != 1)} resolved"
            + (": " + ", ".join(shown) if shown else ""))


def _settings_line(recipe: Recipe, budget: Budget, results: list[dict], per_row: bool = False
                   ) -> str:
    r, d, t = recipe, recipe.data, recipe.train
    examples = next((run["test_examples"] for row in results for run in row["runs"]), None)
    test = f", {examples} test examples" if examples else ""
    train = f"{d.max_train_examples} training examples" if d.max_train_examples \
        else "all training examples"
    model = "each row's networks (Setups, below)" if per_row else f"`{r.model.name}`"
    objective = "" if per_row else f"; objective `{r.objective.name}`" + "".join(
        f", {k}={v}" for k, v in sorted(r.objective.args.items()))
    return (f"Budget **{budget.name}**: {budget.dataset}, data.source `{d.source}`, {train}"
            f"{test}, {model} at {d.image_size} px, {t.epochs} epochs, batch {t.batch_size}, "
            f"{'Adam' if t.optimizer == 'adam' else 'SGD'} lr {t.lr:g} ({t.schedule}), "
            f"weight decay {t.weight_decay:g}, "
            f"precision {t.mixed_precision}{objective}.")


def write_report(study: Study, budget: Budget, study_dir: Path, rows: Sequence[Row],
                 seeds: int, recipes: dict[str, Sequence[Recipe]]) -> Path:
    """``results.json``, ``report.md`` and the plots of a study, from its runs' files."""
    results = collect(study_dir, rows, seeds, recipes, study.extras, study.baseline)
    book = read_json(study_dir / "study.json", {"invocations": []})
    write_json(study_dir / "results.json", {"study": study.name, "budget": budget.name,
                                            "seeds": seeds, "confidence": LEVEL,
                                            "rows": results})
    plots = [plot_bars(study, budget, results, study_dir / "errors.png")]
    if study.x_label:
        plots.append(plot_curves(study, budget.name, results, study_dir / "curves.png"))
    plots = [p for p in plots if p is not None]

    done = sum(len(r["runs"]) for r in results)
    total = seeds * len(rows)
    compared = any(r["difference"] for r in results)
    per_student = any(row.cells for row in rows)
    column_bases = any(c.baseline for row in rows for c in row.cells)
    lines = [f"# {study.name}: {study.title}", "",
             _settings_line(recipes[rows[0].key][0], budget, results, per_student)
             + f" Why: {budget.why}", "",
             f"Paper numbers: {study.source}." + (
                 " On this budget the data and the network differ from the paper's: compare "
                 "orderings and differences, not absolute errors." if budget.needs_source is False
                 else ""), ""]
    lines += [study.notes, ""] if study.notes else []
    lines += [f"Runs finished: {done} of {total} ({seeds} seed(s) x {len(rows)} rows)"
              + ("" if done == total else " — **incomplete**: run the same command again to "
                                          "continue") + ".", ""]
    if compared or column_bases:
        lines += [f"Paired differences: {verdict_summary(results)}.", ""]
    if per_student:
        lines += _student_lines(rows, results, seeds)
        lines += _difference_legend() if column_bases else []
    lines += _row_table(study, results, seeds, compared, per_student)
    lines += _difference_legend() if compared and not column_bases else []
    lines += _noise_lines(results) + _cost_lines(results)
    if per_student:
        lines += ["## Setups", "", "Each row's overrides on top of the budget's:", ""]
        lines += [f"- `{row.key}`: `{shlex.join(row.overrides)}`" for row in rows] + [""]
    lines += ["## Plots", ""] + ([f"![{p.stem}]({p.name})" for p in plots] or
                                 ["(none yet: no finished run)"]) + [""]
    lines += _run_lines(results) + _provenance_lines(book)
    path = study_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _row_table(study: Study, results: list[dict], seeds: int, compared: bool,
               per_student: bool) -> list[str]:
    """Every row's head 0, best head and ensemble errors, its difference to the baseline row,
    the extras and the costs."""
    lines = [f"## {'Every head: t' if per_student else 'T'}est error (%), mean ± std over seeds",
             ""]
    head = ["setup", "runs", "head 0"] + ([] if per_student else ["paper"])
    bases = {r["difference"]["baseline"] for r in results if r["difference"]}
    if compared:
        name = next(iter(bases)) if len(bases) == 1 else "its baseline"
        head += [f"head 0 − {name} {_CI} (pairs)", f"paper − {name}", "verdict"]
    head += ["best head on hold-out", "ensemble", *(e.label for e in study.extras), "time ×",
             "memory ×", "FLOPs ×", "params ×"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        paper = "—" if r["paper"] is None else f"{r['paper'][0]:.2f} ± {r['paper'][1]:.2f}"
        cells = [r["label"], f"{len(r['runs'])}/{seeds}", _pm(r["head0_err"])]
        cells += [] if per_student else [paper]
        if compared:
            cells += (["baseline", "", ""] if r["key"] in bases else ["", "", ""]) \
                if r["difference"] is None else _difference(r["difference"], len(bases) > 1)
        cells += [_pm(r["best_err"]), _pm(r["ensemble_err"])]
        cells += [_pm(r[e.key], e.digits) for e in study.extras]
        cells += [_ratio(r["cost"], k) for k in ("time_ratio", "mem_ratio", "flop_ratio",
                                                 "params_ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "head 0: the first head; best head: the head with the best hold-out "
                    "accuracy, its test error; ensemble: the mean of all heads' logits. One head "
                    "means all three are the same model."
                    + "".join(f" {e.about}." for e in study.extras if e.about), ""]


def _student_lines(rows: Sequence[Row], results: list[dict], seeds: int) -> list[str]:
    """The per-student table: per column each row's error, the paper's, and the differences
    to the column's baseline row; then which head each cell reads."""
    columns = list(dict.fromkeys(c.column for row in rows for c in row.cells))
    baselines = {c.column: row.key for row in rows for c in row.cells if c.baseline}
    head = ["setup", "runs"]
    for col in columns:
        head += [col, "paper"]
        head += [f"− {baselines[col]} {_CI} (pairs)", f"paper − {baselines[col]}", "verdict"] \
            if col in baselines else []
    lines = ["## Test error (%) per student, mean ± std over seeds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["label"], f"{len(r['runs'])}/{seeds}"]
        for col in columns:
            c = r.get("columns", {}).get(col)
            width = 5 if col in baselines else 2
            if c is None:
                cells += [""] * width
                continue
            cells += [_pm(c["err"]), "—" if c["paper"] is None else f"{c['paper']:.2f}"]
            if "pairs" in c:
                cells += _difference(c)
            else:
                cells += ["baseline", "", ""][:width - 2]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each cell is the test error of one head of the row's runs:"]
    for col in columns:
        heads: dict[str, list[str]] = {}
        for row in rows:
            for c in row.cells:
                if c.column == col:
                    heads.setdefault(_head_words(c.head, c.weights), []).append(row.key)
        lines.append(f"- {col}: " + "; ".join(f"{words} of {', '.join(keys)}"
                                              for words, keys in heads.items()) + ".")
    return lines + ["", "—: not in the paper, or no finished pair; empty: the row has no such "
                    "student.", ""]


def _head_words(head: str, weights: str) -> str:
    """A cell's head in words: "head 1", "the best head on hold-out", "the EMA weights' last
    head"."""
    words = {"best": "best head on hold-out", "last": "last head"}.get(head, f"head {head}")
    if weights == "ema":
        return f"the EMA weights' {words}"
    return f"the {words}" if head in ("best", "last") else words


def _noise_lines(results: list[dict]) -> list[str]:
    stds = [r["head0_err"]["std"] for r in results if r["head0_err"]["std"] is not None]
    examples = next((run["test_examples"] for r in results for run in r["runs"]), None)
    if not stds:
        return ["Seed noise: needs at least two finished seeds of a row.", ""]
    one = f"; one test example is {100 / examples:.2f} points" if examples else ""
    return [f"Seed noise: the std over seeds of head-0 test error is {min(stds):.2f} to "
            f"{max(stds):.2f} points across rows (median {statistics.median(stds):.2f}){one}. "
            "Whether a difference between two rows is resolved is said by its paired "
            "interval, not by these stds.", ""]


def _cost_lines(results: list[dict]) -> list[str]:
    cost = next((r["cost"] for r in results if r["cost"]), None)
    if cost is None:
        return []
    return ["time ×, memory ×: one training step (forward + backward) of the row's training "
            "graph over the plain model, on the study's image size and batch, measured once per "
            f"graph by `collabsurgery.measure.bench` (median of {cost['repeats']} repeats after "
            f"{cost['warmup']} warm-up, {cost['precision']}, execution `{cost['mode']}`) on "
            f"{cost['device']}; clock: {cost['clock']}; memory: {cost['mem_method']}. "
            "FLOPs ×: forward + backward FLOPs. params ×: the training graph's parameters "
            "(every copy of a module once) over the plain model's.", ""]


def _run_lines(results: list[dict]) -> list[str]:
    lines = ["## Runs", "", "| run | epochs | head 0 | best head (index) | ensemble | "
             "wall s (this machine) |", "|---|---|---|---|---|---|"]
    walls = []
    for r in results:
        for run in r["runs"]:
            wall = run["wall_s"]
            walls += [wall] if wall is not None else []
            lines.append(f"| {run['run']} | {run['epoch']} | {run['head0_err']:.2f} | "
                         f"{run['best_err']:.2f} ({run['best_head']}) | "
                         f"{run['ensemble_err']:.2f} | "
                         + ("—" if wall is None else f"{wall:.0f}") + " |")
    if walls:
        lines += ["", f"Training wall time: {sum(walls) / 60:.1f} min for {len(walls)} runs "
                  f"(mean {statistics.fmean(walls) / 60:.2f} min a run)."]
    return lines + [""]


def _provenance_lines(book: dict) -> list[str]:
    lines = ["## Provenance", "", "Each call that worked on this study:", ""]
    for inv in book["invocations"]:
        dirty = " **plus uncommitted changes**" if inv["dirty"] else ""
        threads = f", torch threads {inv['threads']}" if inv.get("threads") else ""
        trained = ", ".join(inv["trained"]) or "none"
        stopped = "".join(f"; **stopped** {k}: {v}" for k, v in inv.get("stopped", {}).items())
        lines += [f"- {inv['started']}: `{inv['command']}` on code `{inv['git']}`{dirty}"
                  f"{threads}; trained: {trained}{stopped}"]
    return lines


def write_index(path: Path, studies: Sequence[tuple[Study, Path]], budget: Budget,
                command: str, waiting: Sequence[Study] = ()) -> Path:
    """An index page at ``path``: per study (and its directory) a link to its report.md and one
    line on its runs and paired differences, read from its results.json."""
    lines = [f"# Studies on the {budget.name} budget", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S')}. Each line links "
             "a study's report and counts its paired differences to the baseline rows: "
             f"resolved when the {LEVEL:.0%} interval excludes 0; agree or disagree: with the "
             "paper's difference (each report's legend gives the rule).", ""]
    for study, study_dir in studies:
        link = Path(os.path.relpath(study_dir / "report.md", path.parent)).as_posix()
        results = read_json(study_dir / "results.json", None)
        if results is None:
            lines.append(f"- [{study.name}]({link}): {study.title}: no report yet.")
            continue
        done = sum(len(r["runs"]) for r in results["rows"])
        total = results["seeds"] * len(results["rows"])
        lines.append(f"- [{study.name}]({link}): {study.title}: {done} of {total} runs; "
                     f"{verdict_summary(results['rows'])}.")
    if waiting:
        lines += ["", "Not landed yet: " + "; ".join(f"{s.name} (needs {s.needs})"
                                                     for s in waiting) + "."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
