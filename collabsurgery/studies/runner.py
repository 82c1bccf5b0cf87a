"""The runner: a study's rows x seeds as strictly validated recipes, trained where missing.

A run is finished when its ``summary.json`` exists and its latest checkpoint has all
``train.epochs`` epochs; finished runs are never trained again. Any other run is trained with
``run.resume=auto``, so an interrupted one continues from its last checkpoint. A run directory
made with other settings (say, another ``train.epochs``) is an error, never silently mixed in.
Every check (study, budget, overrides, existing run directories) is made before the first run
trains, for one study or, with :func:`run_all`, for every landed study.
"""
from __future__ import annotations

import json
import multiprocessing
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from collabsurgery.config.recipe import Recipe, load_recipe, parse_overrides, recipe_to_dict
from collabsurgery.errors import TrainingStopped, UserError
from collabsurgery.studies.catalog import BUDGETS, STUDIES
from collabsurgery.studies.costs import measure_costs
from collabsurgery.studies.report import write_index, write_report
from collabsurgery.studies.spec import Budget, Row, Study
from collabsurgery.studies.store import read_json, run_name, study_directory, write_json
from collabsurgery.train import engine

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
#: keys the runner sets itself; a user override of them would break the study's bookkeeping
RESERVED = {"name": "the study names its runs", "seed": "use --seeds",
            "run.dir": "use --dir", "run.name": "the study names its runs",
            "run.resume": "finished runs are skipped and others resumed automatically",
            "train.max_steps": "a study compares finished runs; use train.epochs"}
#: recipe keys that may differ between the settings of a run directory and a later call
_NOT_SETTINGS = ("run", "data.num_workers", "data.prefetch_factor")


def get_study(name: str) -> Study:
    """The study called ``name``; UserError for an unknown one or one whose method is missing."""
    ready = [s for s in STUDIES.values() if s.needs is None]
    waiting = [s for s in STUDIES.values() if s.needs is not None]
    study = STUDIES.get(name)
    if study is None:
        raise UserError(f"unknown study '{name}'; valid: {', '.join(s.name for s in ready)} "
                        f"(not landed yet: {', '.join(s.name for s in waiting)})")
    if study.needs is not None:
        raise UserError(f"study '{name}' needs method {study.needs} which has not landed yet; "
                        f"studies that can run now: {', '.join(s.name for s in ready)}")
    return study


def get_budget(name: str) -> Budget:
    """The budget called ``name``; UserError for an unknown one."""
    if name not in BUDGETS:
        raise UserError(f"unknown budget '{name}'; valid: {', '.join(BUDGETS)}")
    return BUDGETS[name]


def landed_studies(budget: str) -> list[Study]:
    """The studies that can run on ``budget``: their method has landed and they have rows."""
    return [s for s in STUDIES.values() if s.needs is None and s.rows_for(budget)]


def check_overrides(study: Study, budget: Budget, overrides: Sequence[str]) -> None:
    """Refuse user overrides that would change what the rows compare or how runs are named."""
    given = {".".join(path): value for path, value in parse_overrides(overrides)}
    row_keys = {".".join(path) for row in study.rows for path, _ in parse_overrides(row.overrides)}
    for key in given:
        if key in RESERVED:
            raise UserError(f"override '{key}' is set by the study runner ({RESERVED[key]})")
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in row_keys):
            raise UserError(f"override '{key}' would change what the rows of study "
                            f"'{study.name}' compare (their keys: {', '.join(sorted(row_keys))})")
    if budget.needs_source:
        source = given.get("data.source")
        if source is None or str(source).startswith("builtin:"):
            built_in = ", ".join(b.name for b in BUDGETS.values() if not b.needs_source)
            raise UserError(f"budget '{budget.name}' trains on {budget.dataset}: give "
                            f"data.source=<a save_to_disk directory of it, or its hub id>; "
                            f"budgets on built-in data: {built_in}")


def recipe_for(study: Study, budget: Budget, row: Row, seed: int, study_dir: Path,
               overrides: Sequence[str] = ()) -> Recipe:
    """The strictly validated recipe of one run: budget base + budget + row + user overrides."""
    base = None
    if budget.base is not None:
        base = RECIPES / budget.base
        if not base.is_file():
            raise UserError(f"budget '{budget.name}' is based on {base}, which is missing "
                            "(run from a checkout of the repository)")
    runs = json.dumps(str(study_dir / "runs"))  # a YAML double-quoted string: any path is safe
    return load_recipe(base, [*budget.overrides, *row.overrides, "run.progress=false",
                              *overrides, f"name={study.name}-{row.key}", f"seed={seed}",
                              f"run.dir={runs}", f"run.name={run_name(row, seed)}",
                              "run.resume=auto"])


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _flatten(tree).items()
            if not any(k == n or k.startswith(n + ".") for n in _NOT_SETTINGS)}


def run_state(recipe: Recipe) -> str:
    """``"finished"``, ``"partial"`` (resume it) or ``"new"``; UserError on other settings."""
    run_dir = engine.run_directory(recipe)
    saved_file = run_dir / "recipe.yaml"
    if not saved_file.is_file():
        return "new"
    saved, wanted = _settings(yaml.safe_load(saved_file.read_text())), _settings(
        recipe_to_dict(recipe))
    # a data/train key the run's recipe lacks was added to the recipe format since: it had its
    # default (graph and objective sections are open: a missing key there is simply unset)
    defaults = _settings(recipe_to_dict(Recipe()))
    saved = {**{k: v for k, v in defaults.items() if k not in saved
                and k.split(".")[0] in ("data", "train")}, **saved}
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"{run_dir} was trained with {k}={saved.get(k)!r} but this study asks "
                        f"for {k}={wanted.get(k)!r} ({len(changed)} setting(s) differ); use "
                        "another --dir, or delete that run directory to train it again")
    history = engine.history_of(run_dir)
    if (run_dir / "summary.json").is_file() and history \
            and history[-1]["epoch"] == recipe.train.epochs:
        return "finished"
    return "partial"


def code_version() -> dict[str, Any]:
    """``git rev-parse HEAD`` of the code, and whether the checkout has uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"git": head or "unknown (not a git checkout)", "dirty": bool(status)}


def canonical_command(study: str | None, seeds: int, budget: str, root: str | Path,
                      overrides: Sequence[str], threads: int | None,
                      index: str | Path | None = None) -> str:
    """The command line that runs this study (None: every landed study) again, every option
    spelled out."""
    argv = ["collabsurgery", "reproduce", study or "--all", "--seeds", str(seeds), "--budget",
            budget, "--dir", str(root)]
    if index is not None:
        argv += ["--index", str(index)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return shlex.join([*argv, *overrides])


@dataclass(frozen=True)
class Plan:
    """One study's work in a call: its rows x seeds as validated recipes, and their states."""

    study: Study
    budget: Budget
    seeds: int
    rows: tuple[Row, ...]
    directory: Path
    overrides: tuple[str, ...]
    grid: tuple[tuple[Row, int, Recipe], ...]  # seed-major: early reports cover all rows
    states: dict[str, str]                      # run name -> finished, partial or new


def plan_study(study: str | Study, seeds: int | None, budget: str, root: str | Path,
               overrides: Sequence[str]) -> Plan:
    """Check everything about one study's call and build its grid; trains nothing."""
    study = get_study(study) if isinstance(study, str) else study
    chosen = get_budget(budget)
    seeds = chosen.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    rows = study.rows_for(chosen.name)
    if not rows:
        raise UserError(f"study '{study.name}' has no rows on budget '{chosen.name}'; budgets: "
                        + ", ".join(b for b in BUDGETS if study.rows_for(b)))
    check_overrides(study, chosen, overrides)
    study_dir = study_directory(study, chosen, root)
    grid = tuple((row, seed, recipe_for(study, chosen, row, seed, study_dir, overrides))
                 for seed in range(seeds) for row in rows)
    states = {run_name(row, seed): run_state(recipe) for row, seed, recipe in grid}
    return Plan(study, chosen, seeds, rows, study_dir, tuple(overrides), grid, states)


def _check_max_runs(max_runs: int | None) -> None:
    if max_runs is not None and max_runs < 0:
        raise UserError(f"--max-runs must be >= 0, got {max_runs}")


def train_run(recipe: Recipe, threads: int | None = None) -> tuple[float, str | None]:
    """Train (or resume) one run: its wall seconds and why it stopped (None: it finished)."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        engine.train(recipe)
    except TrainingStopped as err:
        return time.perf_counter() - start, str(err)
    return time.perf_counter() - start, None


def _check_jobs(jobs: int) -> int:
    if not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be an integer >= 1 (runs trained at once), got {jobs}")
    return jobs


def _default_threads(threads: int | None) -> int | None:
    """1 without a GPU (several times faster than 2 on a busy 2-core machine), else as given."""
    return 1 if threads is None and not torch.cuda.is_available() else threads


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def run_study(study: str | Study, *, seeds: int | None = None, budget: str = "small",
              root: str | Path = "studies", overrides: Sequence[str] = (),
              max_runs: int | None = None, threads: int | None = None, jobs: int = 1,
              command: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Train what is missing of ``study`` (resuming), then write its report; returns its dir.

    Args:
        study: a name from :data:`~.catalog.STUDIES`, or a :class:`~.spec.Study`.
        seeds: runs per row (seeds ``0..seeds-1``); default: the budget's.
        budget: a name from :data:`~.catalog.BUDGETS`.
        root: the study directory is ``root/<study>-<budget>``.
        overrides: ``key=value`` for every run (not the keys the rows set).
        max_runs: train at most this many runs now (0: only measure costs and write the report).
        threads: CPU threads for torch; default 1 when there is no GPU, else unchanged.
        jobs: runs trained at once, each in its own process with ``threads`` threads (on a
            CPU, about cores / threads; results do not depend on it).
        command: recorded in the report; default: the equivalent ``collabsurgery`` command.
    """
    _check_max_runs(max_runs)
    plan = plan_study(study, seeds, budget, root, overrides)
    threads = _default_threads(threads)
    record = _execute(plan, max_runs, threads, command or canonical_command(
        plan.study.name, plan.seeds, plan.budget.name, root, plan.overrides, threads), log,
        _check_jobs(jobs))
    _raise_if_stopped(record["stopped"], f"the report in {plan.directory} covers the "
                      "finished runs")
    return plan.directory


def run_all(*, seeds: int | None = None, budget: str = "small", root: str | Path = "studies",
            overrides: Sequence[str] = (), max_runs: int | None = None,
            threads: int | None = None, index: str | Path | None = None, jobs: int = 1,
            log: Callable[[str], None] = print) -> Path:
    """Run every landed study with rows on ``budget`` in turn (as :func:`run_study`), then
    write an index page linking their reports; returns the index's path.

    Every study is checked before the first run trains. ``max_runs`` counts runs over all the
    studies; ``index`` defaults to ``root/index.md``.
    """
    _check_max_runs(max_runs)
    chosen = get_budget(budget)
    studies = landed_studies(chosen.name)
    if not studies:
        raise UserError(f"no landed study has rows on budget '{chosen.name}'")
    plans = [plan_study(s, seeds, chosen.name, root, overrides) for s in studies]
    threads = _default_threads(threads)
    path = Path(root) / "index.md" if index is None else Path(index)
    stopped: dict[str, str] = {}
    done = 0
    for plan in plans:
        record = _execute(plan, None if max_runs is None else max_runs - done, threads,
                          canonical_command(plan.study.name, plan.seeds, chosen.name, root,
                                            plan.overrides, threads), log, _check_jobs(jobs))
        done += len(record["trained"]) + len(record["stopped"])
        stopped.update({f"{plan.study.name}/{k}": v for k, v in record["stopped"].items()})
    if _is_main():
        command = canonical_command(None, plans[0].seeds, chosen.name, root, plans[0].overrides,
                                    threads, index)
        written = write_index(path, [(p.study, p.directory) for p in plans], chosen, command,
                              waiting=[s for s in STUDIES.values() if s.needs is not None])
        log(f"index: {written}")
    _raise_if_stopped(stopped, f"the reports and {path} cover the finished runs")
    return path


def _raise_if_stopped(stopped: dict[str, str], covered: str) -> None:
    if stopped:
        raise TrainingStopped(f"{len(stopped)} run(s) stopped ("
                              + "; ".join(f"{k}: {v}" for k, v in stopped.items())
                              + f"); {covered}")


def _execute(plan: Plan, max_runs: int | None, threads: int | None, command: str,
             log: Callable[[str], None], jobs: int = 1) -> dict[str, Any]:
    """Train the plan's missing runs, record the call in study.json, measure the costs and
    write the report; returns the call's record (``trained``, ``stopped``, ...)."""
    study, study_dir, states = plan.study, plan.directory, plan.states
    main = _is_main()
    record = {"command": command, **code_version(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads,
              "trained": [], "stopped": {}}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        done = sum(s == "finished" for s in states.values())
        log(f"study {study.name} ({plan.budget.name} budget): {len(plan.grid)} runs, {done} "
            f"finished, {sum(s == 'partial' for s in states.values())} to resume -> {study_dir}")
        if main:
            study_dir.mkdir(parents=True, exist_ok=True)
        _train_missing(plan, record, max_runs, study_dir / "timings.json", main, log, jobs,
                       threads)
    finally:
        torch.set_num_threads(before)
        if main and study_dir.is_dir():  # an interrupted call is recorded too
            record["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
            book_file = study_dir / "study.json"
            book = read_json(book_file, {"study": study.name, "budget": plan.budget.name,
                                         "invocations": []})
            book["invocations"].append(record)
            write_json(book_file, book)
    if main:
        recipes = {row.key: [r for rr, _, r in plan.grid if rr is row] for row in plan.rows}
        measure_costs(study_dir, [(row, recipes[row.key]) for row in plan.rows], log)
        report = write_report(study, plan.budget, study_dir, plan.rows, plan.seeds, recipes)
        log(f"report: {report}")
    return record


def _train_missing(plan: Plan, record: dict[str, Any], max_runs: int | None,
                   timings_file: Path, main: bool, log: Callable[[str], None],
                   jobs: int = 1, threads: int | None = None) -> None:
    """Train (or resume) every run that is not finished, at most ``max_runs`` of them, ``jobs``
    at a time (each in its own process, ``threads`` torch threads; 1: in this process).

    A run that stops (non-finite loss) is recorded and the others go on. Runs are independent
    (every random choice is keyed by the run's seed), so running several at once changes only
    the wall time.
    """
    todo = [(i, row, recipe) for i, (row, seed, recipe) in enumerate(plan.grid, 1)
            if plan.states[run_name(row, seed)] != "finished"]
    if max_runs is not None and len(todo) > max_runs:
        todo = todo[:max_runs]
        log("stopping here (--max-runs); run again to continue")

    def finished(row: Row, recipe: Recipe, seconds: float, stopped: str | None) -> None:
        name = run_name(row, recipe.seed)
        if main:
            timings = read_json(timings_file, {})
            timings[name] = timings.get(name, 0.0) + seconds
            write_json(timings_file, timings)
        if stopped is None:
            record["trained"].append(name)
        else:
            log(f"{name} stopped: {stopped}")
            record["stopped"][name] = stopped

    def announce(i: int, row: Row, recipe: Recipe) -> None:
        name = run_name(row, recipe.seed)
        verb = "resuming" if plan.states[name] == "partial" else "training"
        log(f"[{i}/{len(plan.grid)}] {verb} {name}: {row.label}")

    if jobs <= 1 or len(todo) <= 1 or not main:
        for i, row, recipe in todo:
            announce(i, row, recipe)
            finished(row, recipe, *train_run(recipe))
        return
    # spawn: a fresh interpreter per worker (no forked torch or Accelerate state)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for i, row, recipe in todo:
            announce(i, row, recipe)
            futures[pool.submit(train_run, recipe, threads)] = (row, recipe)
        for future in as_completed(futures):
            finished(*futures[future], *future.result())
