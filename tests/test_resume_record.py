"""A resume never rewrites the record of what was trained (issue: `run.resume=auto
train.epochs=2` on a finished 15-epoch run trained nothing and rewrote recipe.yaml)."""
from __future__ import annotations

import pytest

from collabsurgery import cli
from collabsurgery.config.recipe import save_recipe

from helpers import tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")


@pytest.fixture
def finished_run(tmp_path):
    """A finished 2-epoch tiny run (its recipe file beside it) and the run directory."""
    recipe = tiny_recipe(tmp_path / "runs", "run.name=rec", "train.epochs=2")
    recipe_file = save_recipe(recipe, tmp_path / "rec.yaml")
    assert cli.main(["train", "--recipe", str(recipe_file)]) == 0
    return recipe_file, tmp_path / "runs" / "rec"


def _record(run_dir):
    return {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "summary.json",
                                                              "graph.json")}


@pytest.mark.parametrize("override,named", [("train.epochs=1", "train.epochs=1 (was 2)"),
                                            ("train.epochs=3", "train.epochs=3 (was 2)"),
                                            ("train.lr=0.05", "train.lr=0.05 (was 0.1)"),
                                            ("seed=7", "seed=7 (was 0)")])
def test_a_resume_that_changes_training_is_refused_in_one_line(finished_run, override, named,
                                                                capsys):
    recipe_file, run_dir = finished_run
    before = _record(run_dir)
    capsys.readouterr()
    code = cli.main(["train", "--recipe", str(recipe_file), "run.resume=auto", override])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert named in err and "another run.name" in err
    assert _record(run_dir) == before


def test_resuming_a_finished_run_trains_nothing_and_rewrites_nothing(finished_run, capsys):
    recipe_file, run_dir = finished_run
    before = _record(run_dir)
    capsys.readouterr()
    # how the run is written may change (workers, trackers, keep): not what it trains
    assert cli.main(["train", "--recipe", str(recipe_file), "run.resume=auto",
                     "data.num_workers=0", "run.keep=3"]) == 0
    assert "finished its 2 epochs already: nothing to train" in capsys.readouterr().out
    assert _record(run_dir) == before
