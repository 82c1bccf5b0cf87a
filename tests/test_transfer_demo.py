"""The offline transfer demo: pre-train on digits 0-5 (or reuse that run), fine-tune on 6-9 with
CL-ILR beside a single-model fine-tune and a single model from scratch; ``model.pretrained``
naming a training run directory."""
from __future__ import annotations

import pytest

from collabsurgery.config.recipe import load_recipe
from collabsurgery.data.datasets import load_splits
from collabsurgery.train import engine
from collabsurgery.train.demo import run_demo
from helpers import REPO, tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")

FAST = ["train.epochs=1", "data.max_train_examples=32", "train.batch_size=16",
        "run.progress=false"]


def test_the_two_tasks_are_disjoint_classes():
    first = load_recipe(REPO / "recipes/demo-pretrain.yaml").data
    second = load_recipe(REPO / "recipes/demo-finetune.yaml").data
    assert not set(first.classes) & set(second.classes)
    splits = load_splits(source=second.source, classes=second.classes,
                         max_train_examples=second.max_train_examples, image_size=16)
    assert splits.num_classes == 4 and splits.train.epoch_labels().bincount().tolist() == [8] * 4


@pytest.mark.slow
def test_the_transfer_demo_pretrains_once_and_prints_three_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipes name runs/demo-pretrain relative to here
    recipe = str(REPO / "recipes/demo-finetune.yaml")
    assert run_demo(recipe, FAST) is None
    out = capsys.readouterr().out
    assert "== pre-training demo-pretrain" in out
    table = out[out.index("\ntest accuracy ") + 1:].splitlines()
    assert [row.split("  ")[0].strip() for row in table[1:4]] == [
        "single model, from scratch", "single model, fine-tuned",
        "consensus (tree), fine-tuned"]
    assert (tmp_path / "runs/demo-pretrain/checkpoints").is_dir()
    pretrained = engine.history_of(tmp_path / "runs/demo-pretrain")
    run_demo(recipe, FAST)  # again: every run is finished, nothing is trained anew
    assert engine.history_of(tmp_path / "runs/demo-pretrain") == pretrained


@pytest.mark.slow
def test_pretrained_may_name_a_training_run(tmp_path):
    """The fine-tuned graph starts from the head the pre-training run keeps."""
    import torch

    from collabsurgery.export.from_run import load_run

    source = engine.train(tiny_recipe(tmp_path, "run.name=source", "train.max_steps=2",
                                      "graph.heads=1", "graph.split=[]",
                                      "objective.name=single"))
    net, _ = load_run(source)
    recipe = tiny_recipe(tmp_path, f"model.pretrained={source}", "data.classes=[0, 1, 2]")
    tuned = engine.build_net(recipe, 3)
    kept = net.head_state_dict(0)
    for key, value in tuned.head_state_dict(1).items():
        if not key.startswith("fc."):
            assert torch.equal(value, kept[key]), key
