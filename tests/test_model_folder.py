"""timm model folders (``save_timm_folder``): local-dir loading, config.json, weights, card,
refusals, atomic writes, and agreement with ``timm.models.save_for_hf``.

Loading through ``timm.create_model("local-dir:DIR", pretrained=True)`` runs with sockets
disabled: a folder must never need the Hub.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import collabsurgery as cs
from collabsurgery.common.tensorfile import load_state
from collabsurgery.config.recipe import recipe_from_dict, recipe_to_dict
from collabsurgery.errors import UserError
from collabsurgery.export import model_folder
from collabsurgery.export.model_folder import FOLDER_FILES, save_timm_folder

from helpers import assert_same_logits, calibrate_batchnorm, make_input

pytestmark = pytest.mark.usefixtures("one_thread")

C = 7
SIZE = 64
METRICS = {"epoch": 3, "holdout_acc": 0.5, "test_acc": 0.6125, "ensemble_test_acc": 0.63}


def _recipe_text() -> str:
    """A resolved recipe as a run's recipe.yaml holds it (runs.py puts it in the export)."""
    recipe = recipe_from_dict({
        "name": "r18-tree", "model": {"name": "resnet18", "kwargs": {"num_classes": C}},
        "graph": {"pattern": "tree", "heads": 2, "split": "layer2"},
        "objective": {"name": "consensus", "temperature": 2.0},
        "data": {"source": "builtin:digits", "image_size": SIZE}})
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails loudly (HF_HUB_OFFLINE alone would fail quietly)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def net():
    net = cs.wrap("resnet18", split="layer2", heads=2, num_classes=C, input_size=(3, SIZE, SIZE))
    calibrate_batchnorm(net, SIZE)  # initial statistics would make logit comparisons vacuous
    return net.eval()


@pytest.fixture(scope="module")
def run_export(net, tmp_path_factory):
    extra = {"recipe": _recipe_text(), "metrics": METRICS, "run": "r18-tree"}
    return cs.export(net, 1, tmp_path_factory.mktemp("export") / "head1.safetensors",
                     extra_metadata=extra)


@pytest.fixture(scope="module")
def folder(run_export, tmp_path_factory):
    return save_timm_folder(run_export, tmp_path_factory.mktemp("folders") / "r18-tree")


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_folder_holds_exactly_the_hub_files(folder):
    assert sorted(os.listdir(folder)) == sorted(FOLDER_FILES)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left


def test_local_dir_loads_the_exported_head(folder, run_export, net):
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    exported = load_state(run_export)
    state = model.state_dict()
    assert state.keys() == exported.keys()
    assert all(torch.equal(state[k], exported[k]) for k in exported)
    x = make_input(2, SIZE)
    with torch.no_grad():
        assert_same_logits(model(x), net(x)[1])


def test_local_dir_without_pretrained_is_the_architecture_only(folder, run_export):
    """timm reads config.json (architecture, model_args) but loads the weights only with
    pretrained=True: the card's loading line must say so."""
    model = timm.create_model(f"local-dir:{folder}")
    assert type(model).__name__ == "ResNet" and model.num_classes == C
    exported = load_state(run_export)
    assert not torch.equal(model.state_dict()["fc.weight"], exported["fc.weight"])


def test_config_json_describes_the_backbone_and_claims_no_published_weights(folder):
    config = _config(folder)
    assert config["architecture"] == "resnet18"
    assert config["num_classes"] == C and config["num_features"] == 512
    assert config["global_pool"] == "avg"
    assert config["model_args"] == {"num_classes": C, "in_chans": 3, "global_pool": "avg"}
    cfg = config["pretrained_cfg"]
    assert cfg["num_classes"] == C and cfg["input_size"] == [3, SIZE, SIZE]
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    # nothing claims to be timm's published a1_in1k weights, or their license
    assert not {"tag", "license", "origin_url", "paper_ids", "url", "hf_hub_id"} & cfg.keys()


def test_weights_are_the_export_with_format_pt(folder, run_export):
    path = folder / "model.safetensors"
    exported = load_state(run_export)
    written = load_file(str(path))
    assert written.keys() == exported.keys()
    assert all(torch.equal(written[k], exported[k]) for k in exported)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["head"] == "1" and metadata["run"] == "r18-tree"
    assert json.loads(metadata["metrics"]) == METRICS
    load_state(path)  # its own checksum verifies


def test_model_card_gives_tags_recipe_metrics_and_loading_code(folder):
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1:3]
    meta = yaml.safe_load(front)
    assert {"image-classification", "timm", "collabsurgery"} <= set(meta["tags"])
    assert meta["library_name"] == "timm" and "license" not in meta
    assert ("objective `consensus` (temperature=2.0) on a `tree` training graph of 2 heads "
            "split at layer2") in body
    assert "```yaml\n" + _recipe_text().rstrip() + "\n```" in body
    assert "`builtin:digits`" in body
    assert "| test accuracy (this head) | 61.25% |" in body
    assert "| hold-out accuracy (this head) | 50.00% |" in body
    assert "**Exported head:** 1" in body and f"**collabsurgery version:** {cs.__version__}" in body
    assert f'timm.create_model("local-dir:{folder.name}", pretrained=True)' in body
    assert 'timm.create_model("hf-hub:user/repo", pretrained=True)' in body
    assert "import collabsurgery" not in body  # resnet18 is timm's own


def test_license_when_given(run_export, tmp_path):
    folder = save_timm_folder(run_export, tmp_path / "m", license="mit")
    front = (folder / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(front)["license"] == "mit"


def test_matches_timm_save_for_hf(folder, run_export, tmp_path):
    """Same files (plus the card) and config as timm's own writer for the same model and the
    recipe's preprocessing; only the pretrained_cfg keys naming timm's published weights are
    left out."""
    timm_dir = tmp_path / "timm"
    data_config = {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear", "crop_pct": 1.0}
    timm.models.save_for_hf(cs.load_backbone(run_export), timm_dir, safe_serialization=True,
                            data_config=data_config)
    assert sorted(os.listdir(folder)) == sorted(os.listdir(timm_dir) + ["README.md"])
    ours, theirs = _config(folder), json.loads((timm_dir / "config.json").read_text())
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k != "pretrained_cfg"} == \
        {k: v for k, v in theirs.items() if k != "pretrained_cfg"}
    source_keys = {"tag", "license", "origin_url", "paper_ids"}
    assert ours["pretrained_cfg"] == {k: v for k, v in theirs["pretrained_cfg"].items()
                                      if k not in source_keys}
    theirs_state = load_file(str(timm_dir / "model.safetensors"))
    ours_state = load_file(str(folder / "model.safetensors"))
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)


def test_graph_file_export_card_says_so(net, tmp_path):
    export = cs.export(net, 0, tmp_path / "head0.safetensors")  # no recipe, no metrics
    folder = save_timm_folder(export, tmp_path / "plain")
    card = (folder / "README.md").read_text()
    assert "Exported from a graph file (or `cs.export` in Python), not from a training run" in card
    assert "## Metrics" not in card and "## Recipe" not in card
    config = _config(folder)
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]  # timm's default, no recipe
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(model.state_dict()["fc.bias"], load_state(export)["fc.bias"])


def test_refuses_torchvision_export(tmp_path):
    net = cs.wrap("torchvision.resnet18", split="layer2", heads=2, num_classes=C,
                  input_size=(3, 32, 32))
    export = cs.export(net, 0, tmp_path / "tv.safetensors")
    with pytest.raises(UserError) as err:
        save_timm_folder(export, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert "timm-folder needs a timm architecture" in message
    assert "torchvision.resnet18" in message and "valid: --format safetensors" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv.safetensors"]


def test_refuses_non_empty_directory_and_leaves_it(run_export, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty; valid: a new or empty "
                                        "directory"):
        save_timm_folder(run_export, target)
    assert os.listdir(target) == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path) == ["taken"]


def test_empty_directory_is_filled(run_export, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    save_timm_folder(run_export, target)
    assert sorted(os.listdir(target)) == sorted(FOLDER_FILES)
    assert os.listdir(tmp_path) == ["empty"]


def test_failure_leaves_no_half_folder(run_export, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(model_folder, "write_text", broken)  # the card is written last
    with pytest.raises(OSError, match="disk full"):
        save_timm_folder(run_export, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_collabsurgery_architecture_loads_after_import(tmp_path):
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, num_classes=10,
                  input_size=(3, 16, 16))
    calibrate_batchnorm(net, 16)
    net.eval()
    export = cs.export(net, 1, tmp_path / "c20.safetensors")
    folder = save_timm_folder(export, tmp_path / "c20")
    card = (folder / "README.md").read_text()
    assert "`cifar_resnet20` is registered with timm by `collabsurgery.models`" in card
    assert "import collabsurgery.models  # registers cifar_resnet20 with timm" in card
    assert _config(folder)["architecture"] == "cifar_resnet20"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = make_input(2, 16)
    with torch.no_grad():
        assert_same_logits(model(x), net(x)[1])


def test_collabsurgery_architecture_needs_the_import(tmp_path):
    """What the card warns about: timm alone does not know cifar_resnet20, nor does it after
    ``import collabsurgery`` (which imports nothing heavy, so that the command line's --help is
    fast); the card's ``import collabsurgery.models`` registers it."""
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, num_classes=10,
                  input_size=(3, 16, 16))
    folder = save_timm_folder(cs.export(net, 0, tmp_path / "c20.safetensors"), tmp_path / "c20")
    load = f"timm.create_model('local-dir:{folder}', pretrained=True)"
    code = ("import timm\n"
            "for module in ('timm', 'collabsurgery', 'collabsurgery.models'):\n"
            "    __import__(module)\n"
            "    try:\n"
            f"        print(module, {load}.num_classes)\n"
            "    except RuntimeError as err:\n"
            "        print(module, err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["timm Unknown model (cifar_resnet20)",
                                        "collabsurgery Unknown model (cifar_resnet20)",
                                        "collabsurgery.models 10"]
