"""Studies: a grid of recipes over seeds, resumed when half done, reported from the runs' files.

A test-only study of 2 rows x 2 seeds with one tiny epoch each (8 px, 64 examples) stands in for
the paper studies; the catalog's real grids are only built and validated, never trained here.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from collabsurgery import cli, studies
from collabsurgery.recipe import recipe_to_dict
from collabsurgery.studies import (BUDGETS, SIMPLE2, SINGLE, STUDIES, Row, Study, recipe_for,
                                     run_study)
from conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", "data.max_train_examples=64", "data.image_size=8",
        "train.batch_size=16", "train.warmup_epochs=0"]
STUDY = Study("tiny", "two rows", "a test", baseline="single", rows=(
    Row("single", "single model", SINGLE, paper=(6.66, 0.21)),
    Row("simple2", "2 heads, simple sharing", SIMPLE2, paper=(5.97, 0.07))))
RUNS = ["single-seed0", "simple2-seed0", "single-seed1", "simple2-seed1"]  # seed-major order


def run(argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _forget_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


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
        assert cells[2] == mean_std(errors[key]) and cells[7] == mean_std(ensemble)
        for ratio in cells[8:11]:  # time, memory and FLOP ratios were measured
            assert float(ratio) > 0
    line = next(l for l in report.splitlines() if l.startswith("| 2 heads"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    diff = statistics.fmean(errors["simple2"]) - statistics.fmean(errors["single"])
    assert cells[3] == "5.97 ± 0.07" and cells[4] == f"{diff:+.2f}" and cells[5] == "-0.69"
    results = json.loads((study_dir / "results.json").read_text())
    assert results["rows"][0]["head0_err"]["mean"] == pytest.approx(
        statistics.fmean(errors["single"]))
    assert results["rows"][1]["cost"]["flop_ratio"] > 1.3  # 2 heads cost more than one


def test_report_records_command_and_code_version(study):
    study_dir, _ = study
    report = (study_dir / "report.md").read_text()
    assert f"--dir {study_dir.parent}" in report and "train.epochs=1" in report
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.strip() in report


def test_plots_are_valid_png(study):
    study_dir, _ = study
    with Image.open(study_dir / "errors.png") as image:
        image.verify()
        assert image.format == "PNG"
    assert "![errors](errors.png)" in (study_dir / "report.md").read_text()


def test_changed_settings_in_an_existing_study_are_refused(study):
    from collabsurgery.errors import UserError

    study_dir, _ = study
    with pytest.raises(UserError, match="was trained with train.epochs=1"):
        run_study(STUDY, seeds=2, root=study_dir.parent, overrides=[*TINY, "train.epochs=2"],
                  log=lambda s: None)


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
    (["cgl-ablation"], "study 'cgl-ablation' needs method CGL"),
    (["kdcl-targets"], "has not landed yet"),
    (["intra-combos"], "has not landed yet"),
    (["clilr-table1", "--budget", "full"], "give data.source="),
    (["clilr-table1", "--budget", "full", "data.source=builtin:digits"], "give data.source="),
    (["clilr-table1", "graph.heads=2"], "would change what the rows"),
    (["clilr-table1", "run.name=x"], "set by the study runner"),
    (["clilr-table1", "--seeds", "0"], "--seeds must be >= 1"),
    (["clilr-table1", "train.epoch=1"], "unknown recipe key 'train.epoch'"),
])
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    assert run(["reproduce", *argv, "--dir", tmp_path]) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [n for n, s in STUDIES.items() if s.needs is None])
def test_catalog_grids_are_valid_recipes(name, tmp_path):
    """Every row of every landed study, on both budgets, passes strict validation and differs
    from the other rows; the full budget is the paper's ResNet-32 CIFAR-10 recipe."""
    study = STUDIES[name]
    for budget, extra in (("small", []), ("full", ["data.source=/data/cifar10"])):
        rows = study.rows_for(budget)
        assert rows
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
                assert r.data.source == "builtin:digits"


def test_a_stopped_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    from collabsurgery.errors import TrainingStopped
    real_train = studies.engine.train

    def train(recipe):
        if recipe.run.name == "single-seed0":
            raise TrainingStopped("non-finite loss at epoch 1, batch 3")
        return real_train(recipe)

    monkeypatch.setattr(studies.engine, "train", train)
    monkeypatch.setitem(STUDIES, "tiny", STUDY)
    assert run(["reproduce", "tiny", "--seeds", 1, "--dir", tmp_path, *TINY]) == 1
    assert "1 run(s) stopped (single-seed0: non-finite loss" in capsys.readouterr().err
    study_dir = tmp_path / "tiny-small"
    assert (study_dir / "runs" / "simple2-seed0" / "summary.json").is_file()
    report = (study_dir / "report.md").read_text()
    assert "Runs finished: 1 of 2" in report and "**stopped** single-seed0" in report
