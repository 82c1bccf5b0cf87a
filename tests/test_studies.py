"""Studies: a grid of recipes over seeds, resumed when half done, reported from the runs' files.

A test-only study of 2 rows x 2 seeds with one tiny epoch each (8 px, 64 examples) stands in for
the paper studies; the catalog's real grids are only built and validated, never trained here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from collabsurgery import studies
from collabsurgery.config.recipe import recipe_to_dict
from collabsurgery.rundir.metrics import headline
from collabsurgery.studies import (BUDGETS, LABEL_SMOOTHING, SIMPLE2, SINGLE, STUDIES, Row, Study,
                                   cell_error, get_study, head_error, holdout_epoch_error,
                                   paired_difference, recipe_for, run_study, t_interval, verdict)
from collabsurgery.train import engine

from helpers import assert_same_weights, latest_weights, one_line_error, run_cli as run

REPO = Path(__file__).resolve().parents[1]
# graph.execution=loop: auto times the modes, so runs trained apart (--jobs 2 against one
# process) could choose differently and differ in the last bits
TINY = ["train.epochs=1", "data.max_train_examples=64", "data.image_size=8",
        "train.batch_size=16", "train.warmup_epochs=0", "graph.execution=loop"]
STUDY = Study("tiny", "two rows", "a test", baseline="single", rows=(
    Row("single", "single model", SINGLE, paper=(6.66, 0.21)),
    Row("simple2", "2 heads, simple sharing", SIMPLE2, paper=(5.97, 0.07))))
RUNS = ["single-seed0", "simple2-seed0", "single-seed1", "simple2-seed1"]  # seed-major order


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("forget_accelerate_state")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study trained in three calls: 1 run, then the rest, then a resumed partial run.

    Returns the study directory and, per call, what was observed between the calls.
    """
    root = tmp_path_factory.mktemp("studies")
    seen = {}
    study_dir = run_study(STUDY, seeds=2, root=root, overrides=TINY, max_runs=1,
                          log=lambda s: None)
    runs = study_dir / "runs"
    seen["after_first"] = sorted(p.name for p in runs.iterdir())
    seen["first_report"] = (study_dir / "report.md").read_text()
    seen["first_mtimes"] = mtimes(runs / RUNS[0])
    run_study(STUDY, seeds=2, root=root, overrides=TINY, log=lambda s: None)
    seen["second_mtimes"] = mtimes(runs / RUNS[0])
    # an interrupted run: its checkpoint is complete but it never wrote summary.json
    (runs / RUNS[3] / "summary.json").unlink()
    weights = next((runs / RUNS[3] / "checkpoints").glob("ckpt-*/model.safetensors"))
    seen["weights_mtime"] = weights, weights.stat().st_mtime_ns
    run_study(STUDY, seeds=2, root=root, overrides=TINY, log=lambda s: None)
    return study_dir, seen


@pytest.mark.slow
def test_half_finished_study_is_resumed_without_retraining(study):
    study_dir, seen = study
    assert seen["after_first"] == [RUNS[0]]
    assert "Runs finished: 1 of 4" in seen["first_report"] and "incomplete" in seen["first_report"]
    assert seen["second_mtimes"] == seen["first_mtimes"]  # the finished run was not touched
    assert sorted(p.name for p in (study_dir / "runs").iterdir()) == sorted(RUNS)
    for name in RUNS:
        assert (study_dir / "runs" / name / "summary.json").is_file()
    weights, mtime = seen["weights_mtime"]
    assert weights.stat().st_mtime_ns == mtime  # resumed from its last checkpoint, not retrained
    book = json.loads((study_dir / "study.json").read_text())
    assert [inv["trained"] for inv in book["invocations"]] == [RUNS[:1], RUNS[1:], RUNS[3:]]


@pytest.mark.slow
def test_runs_trained_two_at_a_time_equal_the_runs_trained_in_turn(study, tmp_path):
    """--jobs 2 trains each run in its own process: the same weights as one process."""
    parallel = run_study(STUDY, seeds=2, root=tmp_path, overrides=TINY, jobs=2,
                         log=lambda s: None)
    for name in RUNS:
        assert_same_weights(latest_weights(parallel / "runs" / name),
                            latest_weights(study[0] / "runs" / name))
    book = json.loads((parallel / "study.json").read_text())
    assert sorted(book["invocations"][0]["trained"]) == sorted(RUNS)


@pytest.mark.slow
def test_report_numbers_come_from_the_runs_summaries(study):
    study_dir, _ = study
    report = (study_dir / "report.md").read_text()
    assert "Runs finished: 4 of 4" in report and "incomplete" not in report
    errors = {}
    for key in ("single", "simple2"):
        summaries = [json.loads((study_dir / "runs" / f"{key}-seed{s}" / "summary.json")
                                .read_text()) for s in range(2)]
        errors[key] = [100 * (1 - s["head0_test_acc"]) for s in summaries]
        ensemble = [100 * (1 - s["ensemble_test_acc"]) for s in summaries]
        label = next(row.label for row in STUDY.rows if row.key == key)
        line = next(l for l in report.splitlines() if l.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2/2"
        assert cells[2] == mean_std(errors[key]) and cells[8] == mean_std(ensemble)
        for ratio in cells[9:12]:  # time, memory and FLOP ratios were measured
            assert float(ratio) > 0
    assert table_row(report, "single model")[4:7] == ["baseline", "", ""]
    # the paired difference over the 2 seeds, by hand: t(0.975, 1) = 12.7062047
    diffs = [a - b for a, b in zip(errors["simple2"], errors["single"])]
    mean, half = statistics.fmean(diffs), 12.7062047 * statistics.stdev(diffs) / math.sqrt(2)
    low, high = mean - half, mean + half
    expected = "not resolved" if low <= 0 <= high else "agrees" if high < 0 else "disagrees"
    cells = table_row(report, "2 heads, simple sharing")
    assert cells[3] == "5.97 ± 0.07" and cells[5] == "-0.69" and cells[6] == expected
    assert cells[4] == f"{mean:+.2f} [{low + 0:.2f}, {high + 0:.2f}] (2)"
    assert "mean ± t(0.975, pairs − 1) · std / √pairs" in report  # the legend
    results = json.loads((study_dir / "results.json").read_text())
    assert results["rows"][0]["head0_err"]["mean"] == pytest.approx(
        statistics.fmean(errors["single"]))
    assert results["rows"][0]["difference"] is None  # the baseline
    assert results["rows"][1]["difference"] == {
        "baseline": "single", "pairs": 2, "diff": pytest.approx(mean),
        "ci": pytest.approx([low, high]), "paper_diff": pytest.approx(-0.69),
        "verdict": expected}
    assert results["rows"][1]["cost"]["flop_ratio"] > 1.3  # 2 heads cost more than one


@pytest.mark.slow
def test_report_records_command_and_code_version(study):
    study_dir, _ = study
    report = (study_dir / "report.md").read_text()
    assert f"--dir {study_dir.parent}" in report and "train.epochs=1" in report
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.strip() in report


@pytest.mark.slow
def test_plots_are_valid_png(study):
    study_dir, _ = study
    with Image.open(study_dir / "errors.png") as image:
        image.verify()
        assert image.format == "PNG"
    assert "![errors](errors.png)" in (study_dir / "report.md").read_text()


@pytest.mark.slow
def test_changed_settings_in_an_existing_study_are_refused(study):
    from collabsurgery.errors import UserError

    study_dir, _ = study
    with pytest.raises(UserError, match="was trained with train.epochs=1"):
        run_study(STUDY, seeds=2, root=study_dir.parent, overrides=[*TINY, "train.epochs=2"],
                  log=lambda s: None)


@pytest.mark.slow
def test_a_run_recorded_before_a_recipe_key_existed_still_counts(study):
    """A data/train key added to the recipe format since a run was trained had its default
    then, so the run is not refused as 'trained with other settings'."""
    import yaml

    from collabsurgery.studies import get_budget, run_state
    from collabsurgery.train import engine

    study_dir, _ = study
    row = STUDY.rows_for("small")[0]
    recipe = recipe_for(STUDY, get_budget("small"), row, 0, study_dir, TINY)
    saved_file = engine.run_directory(recipe) / "recipe.yaml"
    saved = yaml.safe_load(saved_file.read_text())
    old = yaml.safe_dump({**saved, "data": {k: v for k, v in saved["data"].items()
                                            if k not in ("subsets", "subset_overlap")}})
    original = saved_file.read_text()
    try:
        saved_file.write_text(old)
        assert run_state(recipe) == "finished"
    finally:
        saved_file.write_text(original)


@pytest.mark.slow
def test_cli_report_only(study, monkeypatch, capsys):
    study_dir, _ = study
    monkeypatch.setitem(STUDIES, "tiny", STUDY)
    assert run(["reproduce", "tiny", "--seeds", 2, "--dir", study_dir.parent,
                "--max-runs", 0, *TINY]) == 0
    book = json.loads((study_dir / "study.json").read_text())
    assert book["invocations"][-1]["trained"] == []
    assert book["invocations"][-1]["command"].startswith(
        f"collabsurgery reproduce tiny --seeds 2 --budget small --dir {study_dir.parent}")
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown study 'nope'; valid: clilr-table1"),
    (["kdcl-table7", "--budget", "full"], "has no rows on budget 'full'; budgets: small"),
    (["kdcl-table7", "data.views=per_head"], "would change what the rows"),
    (["kdcl-table7", "graph.heads=2"], "would change what the rows"),  # rows set all of graph
    (["waiting"], "study 'waiting' needs method a future method"),
    (["intra-table1", "graph.local=[layer1]"], "would change what the rows"),
    (["cgl-ablation", "--budget", "full"], "has no rows on budget 'full'; budgets: small"),
    (["cgl-ablation", "data.subsets=true"], "would change what the rows"),
    (["cgl-ablation", "train.lr=0.01"], "would change what the rows"),  # one optimizer
    (["clilr-table1", "--budget", "full"], "give data.source="),
    (["clilr-table1", "--jobs", "0"], "--jobs must be an integer >= 1"),
    (["clilr-table1", "--budget", "full", "data.source=builtin:digits"], "give data.source="),
    (["clilr-table1", "graph.heads=2"], "would change what the rows"),
    (["clilr-table1", "run.name=x"], "set by the study runner"),
    (["clilr-table1", "--seeds", "0"], "--seeds must be >= 1"),
    (["clilr-table1", "train.epoch=1"], "unknown recipe key 'train.epoch'"),
    (["--all", "clilr-table1"], "give a study name or --all, not both (got 'clilr-table1')"),
    ([], "give a study name, or --all for every landed study"),
    (["clilr-table1", "--index", "index.md"], "--index goes with --all"),
    (["--all", "graph.heads=2"], "would change what the rows of study 'clilr-table1'"),
    (["--all", "--budget", "full"], "give data.source="),  # every study checked first
    (["--all", "--max-runs", "-1"], "--max-runs must be >= 0"),
])
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(STUDIES, "waiting", Study("waiting", "a study of a method not landed",
                                                  "a test", needs="a future method"))
    assert run(["reproduce", *argv, "--dir", tmp_path]) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [n for n, s in STUDIES.items() if s.needs is None])
def test_catalog_grids_are_valid_recipes(name, tmp_path):
    """Every row of every landed study, on each budget it has, passes strict validation and
    differs from the other rows; the full budget is the paper's ResNet-32 CIFAR-10 recipe."""
    study = STUDIES[name]
    assert study.rows_for("small")
    for budget, extra in (("small", []), ("full", ["data.source=/data/cifar10"])):
        rows = study.rows_for(budget)
        recipes = [recipe_for(study, BUDGETS[budget], row, 0, tmp_path, extra) for row in rows]
        settings = [json.dumps({k: v for k, v in recipe_to_dict(r).items()
                                if k not in ("name", "run")}, sort_keys=True) for r in recipes]
        assert len(set(settings)) == len(rows)
        for row, r in zip(rows, recipes):
            assert r.run.resume == "auto" and r.run.name == f"{row.key}-seed0"
            if budget == "full":
                assert (r.model.name, r.data.source, r.train.epochs) == \
                    ("cifar_resnet32", "/data/cifar10", 200)
            else:
                assert r.data.source == "builtin:digits-lowres"


@pytest.mark.slow
def test_a_stopped_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from collabsurgery.errors import TrainingStopped
    real_train = engine.train

    def train(recipe):
        if recipe.run.name == "single-seed0":
            raise TrainingStopped("non-finite loss at epoch 1, batch 3")
        return real_train(recipe)

    monkeypatch.setattr(engine, "train", train)
    monkeypatch.setitem(STUDIES, "tiny", STUDY)
    assert run(["reproduce", "tiny", "--seeds", 1, "--dir", tmp_path, *TINY]) == 1
    assert "1 run(s) stopped (single-seed0: non-finite loss" in capsys.readouterr().err
    study_dir = tmp_path / "tiny-small"
    assert (study_dir / "runs" / "simple2-seed0" / "summary.json").is_file()
    report = (study_dir / "report.md").read_text()
    assert "Runs finished: 1 of 2" in report and "**stopped** single-seed0" in report


# ---------------------------------------------------------------------------- kdcl-table7

KDCL = STUDIES["kdcl-table7"]
RESNET, WRN = "ResNet-20 (paper: ResNet-32)", "WRN-16-2"
PEER_MODELS = ["cifar_resnet20", "cifar_wrn16_2"]
#: row -> (graph pattern, objective name, kdcl target, data views, model, columns: head)
KDCL_ROWS = {
    "vanilla-resnet": ("tree", "single", None, "shared", "cifar_resnet20", {RESNET: "0"}),
    "vanilla-wrn": ("tree", "single", None, "shared", "cifar_wrn16_2", {WRN: "0"}),
    "dml": ("peers", "dml", None, "shared", PEER_MODELS, {RESNET: "0", WRN: "1"}),
    "one": ("tree", "one", None, "shared", "cifar_resnet20", {RESNET: "best"}),
    **{f"kdcl-{t}{'-icl' * icl}": ("peers", "kdcl", t, "per_head" if icl else "shared",
                                   PEER_MODELS, {RESNET: "0", WRN: "1"})
       for t in ("naive", "linear", "minlogit", "general") for icl in (False, True)},
    "okddip": ("tree", "okddip", None, "shared", "cifar_resnet20", {RESNET: "last"}),
    "pcl": ("tree", "pcl", None, "per_head", "cifar_resnet20", {RESNET: "best"}),
}


def test_kdcl_table7_has_landed_with_every_table7_row():
    assert get_study("kdcl-table7") is KDCL
    assert [row.key for row in KDCL.rows] == list(KDCL_ROWS)
    assert KDCL.rows_for("small") == KDCL.rows and KDCL.rows_for("full") == ()
    papers = {row.key: tuple(c.paper for c in row.cells) for row in KDCL.rows}
    # 100 - Table 7's accuracy; OKDDip is not in Table 7
    assert papers["vanilla-resnet"] == (30.1,) and papers["vanilla-wrn"] == (27.8,)
    assert papers["dml"] == (26.7, 25.2) and papers["one"] == (26.4,)
    assert papers["kdcl-general-icl"] == (25.7, 24.5) and papers["okddip"] == (None,)
    assert papers["pcl"] == (25.86,)  # PCL's own paper: 74.14% (not in Table 7)
    assert [row.key for row in KDCL.rows for c in row.cells if c.baseline] == \
        ["vanilla-resnet", "vanilla-wrn"]


@pytest.mark.parametrize("key", KDCL_ROWS)
def test_kdcl_table7_row_recipe(key, tmp_path):
    """Each row's recipe loads strictly with its graph, objective, views and students."""
    row = next(r for r in KDCL.rows if r.key == key)
    r = recipe_for(KDCL, BUDGETS["small"], row, 0, tmp_path)
    pattern, objective, target, views, model, columns = KDCL_ROWS[key]
    assert (r.graph.pattern, r.objective.name, r.objective.args.get("target"), r.data.views,
            r.model.name) == (pattern, objective, target, views, model)
    assert {c.column: c.head for c in row.cells} == columns
    assert r.data.augment and r.data.source == "builtin:digits-lowres"  # per_head views need augment
    if key in ("one", "okddip", "pcl"):  # their KL ramp-up fits the 15 epochs
        assert r.objective.args["rampup_epochs"] == 4
    if key == "one":  # no backprop rescaling, as ONE's and OKDDip's authors train
        assert r.graph.args == {"heads": 3, "split": ["layer2"], "rescale": "none"}
    if key == "okddip":
        assert r.graph.args == {"heads": 4, "split": ["layer2", "global_pool"],
                                "branches": [4, 1], "rescale": "none"}
    if key == "pcl":  # each peer on its own view, the temporal means the export's weights
        assert r.graph.args == {"heads": 3, "split": ["layer2", "global_pool"],
                                "branches": [3, 1], "rescale": "none", "views": True}
        assert r.train.ema_decay == 0.9 and r.train.ema_select
        assert [c.weights for c in row.cells] == ["ema"]


def fake_summary(test_acc: list[float], holdout_acc: list[float]) -> dict:
    """A run's summary.json as the engine writes it."""
    def split(accs):
        return {"head_acc": accs, "ensemble_acc": max(accs), "examples": 359,
                "best_head": max(range(len(accs)), key=accs.__getitem__)}
    final = {"epoch": 15, "test": split(test_acc), "holdout": split(holdout_acc)}
    return {**headline(final), "final": final, "num_processes": 1}


def test_head_error_reads_an_index_the_best_on_holdout_or_the_last_head():
    s = fake_summary([0.71, 0.80, 0.75], [0.90, 0.80, 0.95])
    assert [round(head_error(s, h), 6) for h in ("0", "1", "best", "last")] == [29, 20, 25, 25]


def test_holdout_epoch_error_takes_the_best_holdout_epoch_latest_on_a_tie():
    def epoch(n, holdout, test):
        return {"epoch": n, "holdout": {"head_acc": [holdout, 0.0]},
                "test": {"head_acc": [test, 0.0]}}
    history = [epoch(1, 0.5, 0.50), epoch(2, 0.9, 0.80), epoch(3, 0.9, 0.75),
               epoch(4, 0.8, 0.95)]  # epoch 4 is the test set's best: not chosen
    error, chosen = holdout_epoch_error(history, 0)
    assert (round(error, 6), chosen) == (25, 3)
    with pytest.raises(ValueError, match="needs a hold-out split"):
        holdout_epoch_error([{"epoch": 1, "test": {"head_acc": [0.5]}}], 0)
    with pytest.raises(ValueError, match="epoch selector"):
        studies.Study("x", "x", "x", rows=(studies.Row("a", "a", (), cells=(
            studies.Cell("c", "best", epoch="holdout"),)),))


def test_intra_table1_reports_the_holdout_epoch_and_the_last_epoch(tmp_path):
    study = STUDIES["intra-table1"]
    assert [c.epoch for c in study.rows[0].cells] == ["holdout", "last"]
    history = [{"epoch": 1, "holdout": {"head_acc": [0.9]}, "test": {"head_acc": [0.80]}},
               {"epoch": 2, "holdout": {"head_acc": [0.8]}, "test": {"head_acc": [0.70]}}]
    summary = fake_summary([0.70], [0.8])
    assert [round(cell_error(c, summary, history), 6) for c in study.rows[0].cells] == [20, 30]


#: run -> (test accuracies, hold-out accuracies): DML's hold-out best is head 1, ONE's
#: hold-out best (head 2) is not its test best (head 1), OKDDip's leader is the last head
KDCL_RUNS = {"vanilla-resnet-seed0": ([0.70], [0.7]), "vanilla-resnet-seed1": ([0.72], [0.7]),
             "vanilla-wrn-seed0": ([0.75], [0.7]),
             "dml-seed0": ([0.74, 0.77], [0.7, 0.8]), "dml-seed1": ([0.76, 0.78], [0.7, 0.8]),
             "one-seed0": ([0.71, 0.80, 0.75], [0.90, 0.80, 0.95]),
             "okddip-seed1": ([0.70, 0.71, 0.72, 0.79], [0.9, 0.8, 0.8, 0.8])}


def table_row(report: str, label: str) -> list[str]:
    line = next(l for l in report.splitlines() if l.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_kdcl_table7_report_has_a_column_per_student_with_paired_differences(tmp_path):
    study_dir = tmp_path / "kdcl-table7-small"
    for name, (test, holdout) in KDCL_RUNS.items():
        (study_dir / "runs" / name).mkdir(parents=True)
        (study_dir / "runs" / name / "summary.json").write_text(
            json.dumps(fake_summary(test, holdout)))
    # PCL's cell reads the EMA weights' best head on hold-out (head 1), not the live weights'
    pcl = fake_summary([0.60, 0.61, 0.62], [0.9, 0.8, 0.8])
    pcl["final"]["ema"] = fake_summary([0.70, 0.77, 0.75], [0.7, 0.9, 0.8])["final"]
    (study_dir / "runs" / "pcl-seed0").mkdir(parents=True)
    (study_dir / "runs" / "pcl-seed0" / "summary.json").write_text(json.dumps(pcl))
    rows = KDCL.rows_for("small")
    recipes = {row.key: [recipe_for(KDCL, BUDGETS["small"], row, s, study_dir) for s in range(2)]
               for row in rows}
    report = studies.write_report(KDCL, BUDGETS["small"], study_dir, rows, 2, recipes).read_text()

    assert f"| setup | runs | {RESNET} | paper | − vanilla-resnet [95% CI] (pairs) | " \
           f"paper − vanilla-resnet | verdict | {WRN} | paper | " \
           "− vanilla-wrn [95% CI] (pairs) | paper − vanilla-wrn | verdict |" in report
    label = {row.key: row.label for row in rows}
    empty = ["", "", "", "", ""]
    assert table_row(report, label["vanilla-resnet"]) == [
        label["vanilla-resnet"], "2/2", "29.00 ± 1.41", "30.10", "baseline", "", "", *empty]
    assert table_row(report, label["vanilla-wrn"]) == [
        label["vanilla-wrn"], "1/2", *empty, "25.00", "27.80", "baseline", "", ""]
    # head 0 for the ResNet column, head 1 for the WRN; WRN pairs: only seed 0 has a baseline.
    # DML's ResNet is 4 points better on both seeds: an interval of width 0 that excludes 0
    assert table_row(report, "DML") == [
        "DML", "2/2", "25.00 ± 1.41", "26.70", "-4.00 [-4.00, -4.00] (2)", "-3.40", "agrees",
        "22.50 ± 0.71", "25.20", "-2.00 (1)", "-2.60", "not resolved"]
    assert table_row(report, label["one"]) == [label["one"], "1/2", "25.00", "26.40",
                                               "-5.00 (1)", "-3.70", "not resolved", *empty]
    assert table_row(report, label["okddip"]) == [label["okddip"], "1/2", "21.00", "—",
                                                  "-7.00 (1)", "—", "not resolved", *empty]
    assert table_row(report, "KDCL-General with ICL") == [
        "KDCL-General with ICL", "0/2", "—", "25.70", "—", "-4.40", "not resolved",
        "—", "24.50", "—", "-3.30", "not resolved"]
    assert table_row(report, label["pcl"]) == [label["pcl"], "1/2", "23.00", "25.86",
                                               "-7.00 (1)", "-4.24", "not resolved", *empty]
    # the cells of 12 rows but the baselines' own: one resolved, as the paper has it
    assert "Paired differences: 1 of 21 differences resolved: 1 agrees." in report
    assert f"- {RESNET}: head 0 of vanilla-resnet, dml, kdcl-naive" in report
    assert ("the best head on hold-out of one; the last head of okddip; the EMA weights' best "
            "head on hold-out of pcl.") in report
    assert f"- {WRN}: head 0 of vanilla-wrn; head 1 of dml, kdcl-naive" in report
    assert "as the paper evaluates" not in report and "Setups" in report
    assert "2 distill 1" in report and "minutes" in report  # the study's notes
    results = json.loads((study_dir / "results.json").read_text())
    dml = next(r for r in results["rows"] if r["key"] == "dml")
    assert dml["columns"][WRN]["err"]["mean"] == pytest.approx(22.5)
    assert (dml["columns"][WRN]["pairs"], dml["columns"][WRN]["diff"]) == (1, pytest.approx(-2))
    assert (dml["columns"][WRN]["ci"], dml["columns"][WRN]["verdict"]) == (None, "not resolved")
    assert dml["columns"][RESNET]["ci"] == pytest.approx([-4, -4])
    assert (dml["columns"][RESNET]["verdict"], dml["difference"]) == ("agrees", None)
    assert dml["runs"][1]["columns"] == {RESNET: pytest.approx(24), WRN: pytest.approx(22)}


# ---------------------------------------------------------------------------- cgl-ablation

CGL = STUDIES["cgl-ablation"]
BEST = "best student on hold-out"
BLOCKS = ["layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2", "layer3.0",
          "layer3.1", "layer3"]
#: row -> (graph pattern, graph args, objective name, imitation probability, data.subsets,
#: the paper's test error %)
CGL_ROWS = {
    "baseline": ("tree", {"heads": 1, "split": []}, "single", None, False, 25.32),
    "clilr": ("tree", {"heads": 3, "split": ["layer2"], "rescale": "backprop"}, "consensus",
              None, False, 23.39),
    "cgl": ("routed", {"split": BLOCKS, "modules": 2, "students": 4}, "cgl", 0.5, True, 21.99),
    "no-routing": ("instances", {"heads": 4}, "cgl", 0.5, True, 24.25),
    "no-subsets": ("routed", {"split": BLOCKS, "modules": 2, "students": 4}, "cgl", 0.5, False,
                   22.52),
    "no-subgroup": ("routed", {"split": BLOCKS, "modules": 2, "students": 4}, "cgl", 1.0, True,
                    22.77),
}


def test_cgl_ablation_has_landed_with_table4_and_its_table2_references():
    assert get_study("cgl-ablation") is CGL
    assert [row.key for row in CGL.rows] == list(CGL_ROWS)
    assert CGL.rows_for("small") == CGL.rows and CGL.rows_for("full") == ()
    # 100 - the paper's accuracy (Table 2: baseline 74.68, CL-ILR 76.61, CGL 78.01; Table 4)
    assert {row.key: [(c.column, c.head, c.paper) for c in row.cells] for row in CGL.rows} == \
        {key: [(BEST, "best", paper)] for key, (*_, paper) in CGL_ROWS.items()}
    assert [row.key for row in CGL.rows for c in row.cells if c.baseline] == ["baseline"]
    assert [e.path for e in CGL.extras] == ["final.test.diversity"]


@pytest.mark.parametrize("key", list(CGL_ROWS))
def test_cgl_ablation_row_recipe(key, tmp_path):
    """Each row loads strictly with its graph, objective, p and sub-set data, and every row
    trains with the same optimizer and batch (Adam, as the paper and the CGL demo)."""
    row = next(r for r in CGL.rows if r.key == key)
    r = recipe_for(CGL, BUDGETS["small"], row, 0, tmp_path)
    pattern, args, objective, probability, subsets, _ = CGL_ROWS[key]
    assert (r.graph.pattern, r.graph.args, r.objective.name, r.data.subsets) == \
        (pattern, args, objective, subsets)
    assert r.objective.args.get("probability") == probability
    if objective == "cgl":
        assert r.objective.args == {"probability": probability, "temperature": 3.0,
                                    "rampup": [0.0, 0.2]}
    assert (r.train.optimizer, r.train.lr, r.train.weight_decay, r.train.batch_size) == \
        ("adam", 0.003, 0.0, 32)
    assert (r.model.name, r.data.source, r.data.image_size, r.train.epochs) == \
        ("cifar_resnet20", "builtin:digits-lowres", 12, 30)  # the budget's, unchanged


def test_cgl_blocks_are_every_block_boundary_of_resnet20():
    from collabsurgery.graphs import splits

    points = [s for s in splits("cifar_resnet20") if s.startswith("layer")]
    assert points == BLOCKS


def test_summary_value_reads_a_dotted_path_or_none():
    s = {"final": {"test": {"diversity": 0.25, "head_acc": [1.0]}}}
    assert studies.summary_value(s, "final.test.diversity") == 0.25
    assert studies.summary_value(s, "final.holdout.diversity") is None
    assert studies.summary_value(s, "final.test.diversity.x") is None


def test_an_extra_may_not_reuse_a_results_key():
    with pytest.raises(ValueError, match="extra key 'best_err' is taken"):
        Study("x", "x", "x", extras=(studies.Extra("best_err", "final.epoch", "epoch"),))


#: run -> (test accuracies, hold-out accuracies, diversity on test or None: one head)
CGL_RUNS = {"baseline-seed0": ([0.98], [0.97], None), "baseline-seed1": ([0.97], [0.96], None),
            "cgl-seed0": ([0.95, 0.97, 0.96, 0.94], [0.9, 0.97, 0.9, 0.9], 0.11),
            "cgl-seed1": ([0.96, 0.95, 0.98, 0.94], [0.9, 0.9, 0.95, 0.9], 0.13),
            "no-subsets-seed1": ([0.98, 0.99, 0.98, 0.97], [0.97, 0.96, 0.95, 0.94], 0.03)}


def test_cgl_ablation_report_shows_diversity_and_the_best_student(tmp_path):
    study_dir = tmp_path / "cgl-ablation-small"
    for name, (test, holdout, diversity) in CGL_RUNS.items():
        summary = fake_summary(test, holdout)
        if diversity is not None:
            summary["final"]["test"]["diversity"] = diversity
        (study_dir / "runs" / name).mkdir(parents=True)
        (study_dir / "runs" / name / "summary.json").write_text(json.dumps(summary))
    rows = CGL.rows_for("small")
    recipes = {row.key: [recipe_for(CGL, BUDGETS["small"], row, s, study_dir) for s in range(2)]
               for row in rows}
    report = studies.write_report(CGL, BUDGETS["small"], study_dir, rows, 2, recipes).read_text()

    label = {row.key: row.label for row in rows}
    # the per-student table: the best student on hold-out, differences to the baseline by seed
    assert table_row(report, label["baseline"]) == [label["baseline"], "2/2", "2.50 ± 0.71",
                                                    "25.32", "baseline", "", ""]
    # differences +1 and -1: mean 0, std √2, half width t(0.975, 1) = 12.71
    assert table_row(report, label["cgl"]) == [label["cgl"], "2/2", "2.50 ± 0.71", "21.99",
                                               "+0.00 [-12.71, 12.71] (2)", "-3.33",
                                               "not resolved"]
    assert table_row(report, label["no-subsets"]) == [label["no-subsets"], "1/2", "2.00",
                                                      "22.52", "-1.00 (1)", "-2.80",
                                                      "not resolved"]
    # the per-row table: diversity after the ensemble, — for one head or no run; params ×
    assert "| best head on hold-out | ensemble | diversity | time × | memory × | FLOPs × | " \
           "params × |" in report
    every = report.split("## Every head")[1]
    # head 0, best head on hold-out, ensemble (the fake's best test head), diversity
    assert table_row(every, label["cgl"])[2:6] == ["4.50 ± 0.71", "2.50 ± 0.71", "2.50 ± 0.71",
                                                   "0.120 ± 0.014"]
    assert table_row(every, label["no-subsets"])[5] == "0.030"
    assert table_row(every, label["baseline"])[5] == "—"
    assert table_row(every, label["no-routing"])[5] == "—"
    assert "diversity: the mean over test examples and over pairs of heads" in report
    assert "Adam lr 0.003" in report and "Setups" in report
    results = json.loads((study_dir / "results.json").read_text())
    cgl = next(r for r in results["rows"] if r["key"] == "cgl")
    assert cgl["diversity"]["mean"] == pytest.approx(0.12)
    assert [run["diversity"] for run in cgl["runs"]] == [0.11, 0.13]
    base = next(r for r in results["rows"] if r["key"] == "baseline")
    assert base["diversity"] == {"mean": None, "std": None}
    assert [run["diversity"] for run in base["runs"]] == [None, None]


def test_params_ratio_counts_each_module_once():
    """Fig. 3b: CGL's modular network is M x one backbone whatever the number of students;
    independent networks are K x."""
    def key(pattern, **args):
        return {"pattern": pattern, "args": {"model": "cifar_resnet20", "input_size": [3, 12, 12],
                                             "model_kwargs": {"num_classes": 10}, **args}}
    for students in (2, 4, 8):
        assert studies.params_ratio(key("routed", split=BLOCKS, modules=2, students=students,
                                        seed=0)) == pytest.approx(2.0)
    assert studies.params_ratio(key("instances", heads=4)) == pytest.approx(4.0)
    assert studies.params_ratio(key("tree", heads=1, split=[])) == 1.0


def test_a_cost_measured_before_params_ratio_gets_it_without_a_new_bench(tmp_path, monkeypatch):
    study_dir = tmp_path / "tiny-small"
    row = STUDY.rows[1]
    recipe = recipe_for(STUDY, BUDGETS["small"], row, 0, study_dir)
    graph = {"kind": "tree", "args": {"model": "cifar_resnet20", "input_size": [3, 12, 12],
                                      "model_kwargs": {"num_classes": 10}, "heads": 2,
                                      "split": ["layer1"]}}
    run_dir = study_dir / "runs" / "simple2-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "graph.json").write_text(json.dumps(graph))
    key = studies.row_cost_key([recipe])
    (study_dir / "costs.json").write_text(json.dumps({key: {"time_ratio": 1.5}}))
    monkeypatch.setattr("collabsurgery.measure.bench.run_bench", lambda *a, **k: pytest.fail("bench"))
    costs = studies.measure_costs(study_dir, [(row, [recipe])], log=lambda s: None)
    assert costs[key]["time_ratio"] == 1.5 and 1.0 < costs[key]["params_ratio"] < 2.0
    assert json.loads((study_dir / "costs.json").read_text()) == costs


# ---------------------------------------------------------------------------- paired statistics

def test_paired_interval_matches_a_hand_computation():
    """Five pairs (df=4, t(0.975, 4) = 2.7764451); seeds finished on one side only are left
    out."""
    ours = {0: 1.39, 1: 0.84, 2: 1.11, 3: 1.67, 4: 0.56, 5: 2.00}
    theirs = {0: 1.67, 1: 1.39, 2: 1.11, 3: 1.95, 4: 1.11, 6: 0.30}
    # differences -0.28, -0.55, 0, -0.28, -0.55: mean -0.332, squared deviations sum 0.21068
    half = 2.7764451 * math.sqrt(0.21068 / 4) / math.sqrt(5)
    d = paired_difference(ours, theirs, paper_diff=-0.8)
    assert (d["pairs"], d["diff"]) == (5, pytest.approx(-0.332))
    assert d["ci"] == pytest.approx([-0.332 - half, -0.332 + half], abs=1e-7)
    assert d["ci"][1] < 0 and d["verdict"] == "agrees"  # resolved: the interval excludes 0


def test_an_interval_that_contains_zero_is_not_resolved_whatever_the_mean():
    d = paired_difference({0: 1.0, 1: 3.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 1.5}, paper_diff=1.0)
    assert d["diff"] == pytest.approx(1.1666667) and d["ci"][0] < 0 < d["ci"][1]
    assert d["verdict"] == "not resolved"
    one = paired_difference({0: 9.0, 1: 9.0}, {1: 1.0, 2: 1.0}, paper_diff=8.0)
    assert (one["pairs"], one["diff"], one["ci"], one["verdict"]) == (1, 8.0, None,
                                                                      "not resolved")
    assert t_interval([8.0]) is None and t_interval([]) is None


@pytest.mark.parametrize("interval, paper, expected", [
    ((-0.6, -0.05), -0.8, "agrees"),
    ((0.05, 0.6), 0.3, "agrees"),
    ((0.05, 0.6), -0.8, "disagrees"),           # resolved, the other sign
    ((-0.6, -0.05), 0.05, "disagrees"),         # the paper saw no difference, we do
    ((-0.6, -0.05), -0.1, "agrees"),            # 0.1 points is a difference
    ((-0.6, 0.1), -0.8, "not resolved"),
    ((0.0, 0.5), 0.3, "not resolved"),          # a bound at 0 does not exclude it
    (None, -0.8, "not resolved"),               # fewer than 2 pairs
    ((0.05, 0.6), None, "resolved"),
    ((-0.6, 0.1), None, "not resolved"),
])
def test_verdict_rule(interval, paper, expected):
    assert verdict(interval, paper) == expected


# ---------------------------------------------------------------------------- a new study, --all

#: a method's study as it is added: one catalog entry, and nothing else
DUMMY = Study("dummy", "a method added as one catalog entry", "a test with made-up numbers",
              baseline="plain", notes="Only the dummy study says this.", rows=(
                  Row("plain", "plain model", SINGLE, paper=(5.0, 0.1)),
                  Row("smoothed", "label smoothing", LABEL_SMOOTHING, paper=(4.5, 0.1))))
WAITING = Study("waiting", "a study of a method not landed", "a test", needs="a future method")


@pytest.fixture
def catalog_of(monkeypatch):
    """Make the catalog hold only the given studies for one test (the real ones come back)."""
    def register(*entries: Study) -> None:
        for name in list(STUDIES):
            monkeypatch.delitem(STUDIES, name)
        for entry in entries:
            monkeypatch.setitem(STUDIES, entry.name, entry)
    return register


@pytest.mark.slow
def test_a_study_added_to_the_catalog_alone_runs_and_is_reported(catalog_of, tmp_path):
    catalog_of(DUMMY, WAITING)
    assert run(["reproduce", "--all", "--seeds", 2, "--dir", tmp_path, *TINY]) == 0
    study_dir = tmp_path / "dummy-small"
    assert sorted(p.name for p in (study_dir / "runs").iterdir()) == [
        "plain-seed0", "plain-seed1", "smoothed-seed0", "smoothed-seed1"]
    report = (study_dir / "report.md").read_text()
    assert "Runs finished: 4 of 4" in report and "Only the dummy study says this." in report
    assert table_row(report, "label smoothing")[6] in ("agrees", "disagrees", "not resolved")
    for word in ("CL-ILR", "consensus", "hierarchical", "paper 000"):  # method-neutral text
        assert word not in report
    results = json.loads((study_dir / "results.json").read_text())
    assert results["rows"][1]["difference"]["pairs"] == 2
    index = (tmp_path / "index.md").read_text()
    assert f"collabsurgery reproduce --all --seeds 2 --budget small --dir {tmp_path}" in index
    assert "- [dummy](dummy-small/report.md): a method added as one catalog entry: 4 of 4 " \
           "runs; " in index
    assert "Not landed yet: waiting (needs a future method)." in index
    # and by name, like any study: nothing left to train
    assert run(["reproduce", "dummy", "--seeds", 2, "--dir", tmp_path, *TINY]) == 0
    book = json.loads((study_dir / "study.json").read_text())
    assert [inv["trained"] for inv in book["invocations"]] == [
        ["plain-seed0", "smoothed-seed0", "plain-seed1", "smoothed-seed1"], []]


def write_summaries(study_dir: Path, errors: dict[str, list[float]]) -> None:
    """Fake finished runs of one head: row key -> test error % per seed."""
    for key, row_errors in errors.items():
        for seed, error in enumerate(row_errors):
            run_dir = study_dir / "runs" / f"{key}-seed{seed}"
            run_dir.mkdir(parents=True)
            summary = fake_summary([1 - error / 100], [0.9])
            (run_dir / "summary.json").write_text(json.dumps(summary))


TWO = Study("two", "a resolved difference and a paper tie", "a test", baseline="base", rows=(
    Row("base", "base", SINGLE, paper=(5.0, 0.1)),
    Row("better", "better", LABEL_SMOOTHING, paper=(4.2, 0.1)),
    Row("tie", "tie", SIMPLE2, paper=(5.05, 0.1))))
#: per seed: "better" is 0.5 to 0.9 points below base (resolved, as the paper); "tie" is
#: 1 to 1.4 above (resolved) where the paper saw no difference (+0.05 < 0.1): disagrees
TWO_ERRORS = {"base": [2.0, 2.4, 1.8, 2.2, 2.0], "better": [1.4, 1.6, 1.3, 1.5, 1.1],
              "tie": [3.2, 3.6, 3.0, 3.6, 3.2]}


def test_reproduce_all_writes_an_index_with_a_verdict_line_per_study(catalog_of, tmp_path,
                                                                     capsys):
    catalog_of(TWO, DUMMY)
    write_summaries(tmp_path / "two-small", TWO_ERRORS)
    index = tmp_path / "docs" / "index.md"
    assert run(["reproduce", "--all", "--max-runs", 0, "--dir", tmp_path / "studies",
                "--index", index]) == 0
    assert f"index: {index}" in capsys.readouterr().out
    lines = index.read_text().splitlines()
    assert "# Studies on the small budget" in lines
    # the fake runs are not under --dir/studies: no runs there, so nothing is resolved
    assert any(l.startswith("- [two](../studies/two-small/report.md)") for l in lines)
    assert run(["reproduce", "--all", "--max-runs", 0, "--dir", tmp_path,
                "--index", index]) == 0
    lines = index.read_text().splitlines()
    assert "- [two](../two-small/report.md): a resolved difference and a paper tie: 15 of 15 " \
           "runs; 2 of 2 differences resolved: 1 agrees, 1 disagrees." in lines
    assert "- [dummy](../dummy-small/report.md): a method added as one catalog entry: 0 of 10 " \
           "runs; 0 of 1 difference resolved." in lines
    report = (tmp_path / "two-small" / "report.md").read_text()
    for key, paper in (("better", "-0.80"), ("tie", "+0.05")):
        diffs = [a - b for a, b in zip(TWO_ERRORS[key], TWO_ERRORS["base"])]
        mean = statistics.fmean(diffs)
        half = 2.7764451 * statistics.stdev(diffs) / math.sqrt(5)
        cells = table_row(report, key)
        assert cells[4:7] == [f"{mean:+.2f} [{mean - half:.2f}, {mean + half:.2f}] (5)", paper,
                              "agrees" if key == "better" else "disagrees"]
    assert "Paired differences: 2 of 2 differences resolved: 1 agrees, 1 disagrees." in report


def test_the_small_budget_runs_5_seeds_by_default():
    assert BUDGETS["small"].seeds == 5


def test_a_catalog_refuses_two_studies_of_one_name_and_a_study_its_mistakes():
    with pytest.raises(ValueError, match="two studies are called 'dummy'"):
        studies.catalog(DUMMY, DUMMY)
    with pytest.raises(ValueError, match="baseline 'nope' is not a row"):
        dataclasses.replace(DUMMY, baseline="nope")
    with pytest.raises(ValueError, match="row key 'plain' is used twice"):
        dataclasses.replace(DUMMY, rows=(DUMMY.rows[0], DUMMY.rows[0]))


#: two series over x, each point of "cl" compared with "single" at the same x (Row.baseline)
SERIES = Study("series", "rows with their own baseline rows", "a test", rows=tuple(
    Row(f"{key}-{x}", f"{key}, x {x}", SINGLE, series=key, x=x,
        baseline=None if key == "single" else f"single-{x}")
    for key in ("single", "cl") for x in (0, 1)))
SERIES_ERRORS = {"single-0": [2.0, 2.4, 1.8], "single-1": [5.0, 5.2, 4.6],
                 "cl-0": [2.1, 2.3, 1.9], "cl-1": [4.0, 4.1, 3.7]}


def test_a_row_is_compared_with_its_own_baseline_row(catalog_of, tmp_path):
    catalog_of(SERIES)
    write_summaries(tmp_path / "series-small", SERIES_ERRORS)
    assert run(["reproduce", "series", "--seeds", 3, "--max-runs", 0, "--dir", tmp_path]) == 0
    results = {r["key"]: r for r in json.loads(
        (tmp_path / "series-small" / "results.json").read_text())["rows"]}
    assert results["single-0"]["difference"] is None
    at0, at1 = results["cl-0"]["difference"], results["cl-1"]["difference"]
    assert (at0["baseline"], at1["baseline"]) == ("single-0", "single-1")
    assert at0["diff"] == pytest.approx(0.1 / 3) and at0["verdict"] == "not resolved"
    assert at1["diff"] == pytest.approx(-1.0) and at1["verdict"] == "resolved"
    report = (tmp_path / "series-small" / "report.md").read_text()
    assert table_row(report, "cl, x 1")[4].endswith("(3) vs single-1")
    assert table_row(report, "single, x 1")[4] == "baseline"
    with pytest.raises(ValueError, match="not a row"):
        Study("x", "x", "x", rows=(Row("a", "a", (), baseline="b"),))
