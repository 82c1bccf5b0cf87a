"""Every ``recipes/demo-*.yaml`` runs through ``collabsurgery demo`` (tiny overrides), or is
refused in one line, exit 2, when the demo's comparison makes no sense for it.

A new demo recipe is covered by being added to ``recipes/``; one the demo cannot compare is
listed in :data:`REFUSED` with the reason the user is told.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from collabsurgery import cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forget_accelerate_state", "one_thread")]
REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPES = sorted((REPO / "recipes").glob("demo*.yaml"))
TINY = ("train.epochs=1", "data.max_train_examples=128", "data.image_size=12")
#: demo recipes that train one plain model (the baseline itself):
#: the demo says so and names the command that trains them
REFUSED = {"demo-pretrain": "trains one head"}


def test_every_demo_recipe_is_covered():
    assert {p.stem for p in DEMO_RECIPES} >= {"demo", "demo-cgl", "demo-dml", "demo-kd", *REFUSED}


@pytest.mark.parametrize("recipe", DEMO_RECIPES, ids=lambda p: p.stem)
def test_demo_runs_every_demo_recipe(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ a recipe names (a teacher, a pre-training run) go here
    code = cli.main(["demo", "--recipe", str(recipe), *TINY, f"run.dir={tmp_path / 'runs'}"])
    out, err = capsys.readouterr()
    if recipe.stem in REFUSED:
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and REFUSED[recipe.stem] in err
        assert f"collabsurgery train --recipe {recipe}" in err
        assert not (tmp_path / "runs").exists()
        return
    assert code == 0, err
    if "fine-tuned" in out:  # the transfer demo: three accuracies, no export
        assert re.search(r"single model, from scratch\s+\d\.\d{4}", out)
        return
    assert re.search(r"^single model\s+\d\.\d{4}", out, re.M), out
    if recipe.stem == "demo-okddip":  # the head `collabsurgery export` keeps: the leader
        assert "exported head 3 " in out
    difference = re.search(r"max \|logit difference\| vs the training graph = (\S+)", out)
    assert difference and float(difference.group(1)) < 1e-4, out
