"""Strict YAML recipes: defaults, errors that name the key, overrides, round trip."""

import re
from pathlib import Path

import pytest
import yaml

from collabsurgery.config.recipe import (DataConfig, Recipe, load_recipe, parse_overrides,
                                         recipe_from_dict, recipe_to_dict, save_recipe)
from collabsurgery.errors import UserError
from collabsurgery.train.engine import build_net, build_objective_from


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_load(tmp_path):
    assert load_recipe(None) == Recipe()
    assert load_recipe(write(tmp_path, "")) == Recipe()
    r = load_recipe(write(tmp_path, "name: x\ntrain: {epochs: 3}\n"))
    assert r.name == "x" and r.train.epochs == 3 and r.train.lr == 0.1
    assert r.data == DataConfig() and r.run_name == "x"


def test_yaml_quirks_are_accepted(tmp_path):
    r = load_recipe(write(tmp_path, "train:\n  mixed_precision: no\n  weight_decay: 5e-4\n"
                                    "  lr: 1\nrun:\n  resume: no\n"))
    assert r.train.mixed_precision == "no" and r.run.resume == "no"
    assert r.train.weight_decay == 5e-4 and isinstance(r.train.lr, float)


@pytest.mark.parametrize("text, key", [
    ("train:\n  epoch: 3\n", "train.epoch"),                  # unknown key
    ("trian:\n  epochs: 3\n", "trian"),                       # unknown section
    ("graph:\n  beta: 0.5\n", "graph.beta"),                  # key in the wrong section
    ("train:\n  epochs: '3'\n", "train.epochs"),              # wrong type
    ("train:\n  epochs: 2.5\n", "train.epochs"),              # float for int
    ("train:\n  nesterov: 1\n", "train.nesterov"),            # int for bool
    ("train:\n  epochs: true\n", "train.epochs"),             # bool is not an int
    ("train:\n  lr: -0.1\n", "train.lr"),
    ("train:\n  epochs: 0\n", "train.epochs"),
    ("data:\n  label_noise: 1.0\n", "data.label_noise"),
    ("data:\n  holdout_fraction: 0\n", "data.holdout_fraction"),
    ("graph:\n  pattern: trees\n", "graph.pattern"),          # unknown enum value
    ("train:\n  mixed_precision: fp8\n", "train.mixed_precision"),
    ("graph:\n  pattern: instances\n  branches: [4]\n", "graph.branches"),  # not an argument
    ("graph:\n  pattern: peers\n  split: [layer1]\n", "graph.split"),         # of the pattern
    ("graph:\n  input_size: [3, 8, 8]\n", "graph.input_size"),   # set from data.image_size
    ("objective:\n  smoothing: 0.1\n", "objective.smoothing"),   # not consensus's argument
    ("objective:\n  name: consensu\n", "objective.name"),
    ("train:\n  schedule: multistep\n", "train.milestones"),
    ("train:\n  schedule: step\n", "train.decay_epochs"),
    ("train:\n  schedule: multistep\n  milestones: [5, 2]\n", "train.milestones"),
    ("model:\n  kwargs: 3\n", "model.kwargs"),
    ("model: resnet50\n", "model"),                           # section given as a scalar
    ("run:\n  name: a/b\n", "run.name"),
])
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=re.escape(f"'{key}'")):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("graph:\n  split: [layer2, 3]\n", "graph.split"),        # wrong element type
    ("graph:\n  split: [layer1, layer1]\n", "graph.split"),   # twice
    ("graph:\n  heads: 0\n", "graph.heads"),                  # impossible values
    ("graph:\n  split: []\n", "graph.split"),                 # tree with 4 heads needs a split
    ("graph:\n  split: [layer1, layer2]\n  branches: [2, 3]\n", "graph.branches"),
    ("graph:\n  execution: fast\n", "graph.execution"),
    ("objective:\n  beta: 1.5\n", "objective.beta"),
    ("objective:\n  temperature: 0\n", "objective.temperature"),
    ("objective:\n  temperature: abc\n", "objective.temperature"),  # a string, not a number
    ("objective:\n  name: label_smoothing\n  smoothing: true\n", "objective.smoothing"),
])
def test_argument_values_are_checked_by_the_builder_naming_the_key(tmp_path, text, key):
    """Graph and objective arguments pass through to their builder/constructor, whose complaint
    names the recipe key (before a run writes anything)."""
    recipe = load_recipe(write(tmp_path, text))
    with pytest.raises(UserError, match=re.escape(f"recipe key '{key}'")):
        build_net(recipe, num_classes=10)
        build_objective_from(recipe)


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, "train:\n  epoch: 3\n"))
    msg = str(e.value)
    assert "did you mean 'train.epochs'" in msg and "batch_size" in msg and "\n" not in msg
    with pytest.raises(UserError, match="did you mean 'objective.beta'"):
        load_recipe(None, ["graph.beta=0.3"])
    with pytest.raises(UserError, match="must be one of tree, instances, peers"):
        load_recipe(None, ["graph.pattern=trees"])


def test_valid_edge_values(tmp_path):
    r = load_recipe(None, ["graph.pattern=instances", "graph.split=null", "objective.beta=1",
                           "graph.heads=1", "train.schedule=multistep", "train.milestones=[2, 5]",
                           "data.max_train_examples=100", "train.grad_clip=1"])
    assert r.graph.args == {"heads": 1} and r.objective.args == {"beta": 1}
    assert r.train.grad_clip == 1.0
    r = load_recipe(None, ["graph.heads=1", "graph.split=[]"])
    assert r.graph.args == {"heads": 1, "split": []}
    assert build_net(r, num_classes=10).num_heads == 1


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(UserError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_overrides_apply(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 5\n")
    r = load_recipe(path, ["train.epochs=1", "graph.split=[layer1,layer3]", "data.source=/x/y",
                           "model.kwargs.drop_rate=0.2", "run.name=", "train.mixed_precision=bf16"])
    assert r.train.epochs == 1 and r.graph.args["split"] == ["layer1", "layer3"]
    assert r.data.source == "/x/y" and r.model.kwargs == {"drop_rate": 0.2}
    assert r.run.name is None and r.train.mixed_precision == "bf16"
    assert parse_overrides(["a.b=[1, 2]", "c=x=y"]) == [(["a", "b"], [1, 2]), (["c"], "x=y")]


@pytest.mark.parametrize("override, match", [
    ("train.epoch=1", "train.epoch"),
    ("trian.epochs=1", "trian"),
    ("train.epochs=x", "train.epochs"),
    ("train.epochs.x=1", "train.epochs"),
    ("train.epochs", "malformed override"),
    ("=1", "malformed override"),
    ("train..epochs=1", "malformed override"),
    ("graph.split=[a", "not valid YAML"),
])
def test_override_errors(override, match):
    with pytest.raises(UserError, match=match):
        load_recipe(None, [override])


def test_save_load_round_trip(tmp_path):
    r = load_recipe(None, ["name=rt", "graph.split=[layer2]", "graph.branches=[4]",
                           "model.kwargs={drop_rate: 0.1}", "train.weight_decay=1e-4",
                           "data.holdout_split=validation", "run.log_with=[tensorboard]"])
    path = save_recipe(r, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(path) == r
    assert recipe_to_dict(r) == yaml.safe_load(path.read_text())
    assert recipe_from_dict(recipe_to_dict(r)) == r
    assert "mixed_precision: 'no'" in path.read_text()
