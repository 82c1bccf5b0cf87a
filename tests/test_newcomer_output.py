"""What a newcomer reads: help that lists every command and shows defaults without importing
torch, execution lines in plain words, the quick-trial environment variable, the load line of a
timm folder of the papers' CIFAR models, the tree's default heads, thread control."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.graphs.execution.executor import Unsupported

from helpers import make_input, train_step, tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")


def test_top_level_help_lists_every_command_and_imports_no_torch():
    code = ("import sys\nfrom collabsurgery.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.rstrip().endswith("NO TORCH")
    for command in ("splits", "wrap", "bench", "export", "evaluate", "train", "reproduce",
                    "finetune-detection", "demo"):
        assert f"    {command}" in out
    assert "finetune-detection." in " ".join(out.split())  # the description names it too


@pytest.mark.parametrize("command,shown", [
    ("bench", ["--image-size N", "(default: 224)", "(default: 16)", "(default: 5)",
               "(default: 2)"]),
    ("finetune-detection", ["(default 10)", "(default 8)", "(default 0.9)", "(default 0.0001)",
                            "(default 0)"]),
    ("demo", ["recipe keys for both runs", "--threads N"]),
    ("train", ["recipe keys to change", "--threads N"]),
    ("splits", ["classes of the model's classifier"]),
])
def test_help_shows_defaults_and_explains_every_argument(command, shown, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in shown:
        assert " ".join(phrase.split()) in text, phrase


def test_a_tree_has_two_heads_per_split_point_unless_told():
    assert cs.wrap("cifar_resnet20", split="layer1", input_size=(3, 16, 16)).num_heads == 2
    assert cs.wrap("cifar_resnet20", split="layer1,layer2", input_size=(3, 16, 16)).num_heads == 4
    net = cs.wrap("cifar_resnet20", split="layer1,layer2", branches=(3, 1),
                  input_size=(3, 16, 16))
    assert net.num_heads == 3


def test_execution_lines_are_plain_words():
    net = cs.wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
    described = net.describe_execution()
    assert "not run yet" not in described
    assert "no training step run by this process yet" in described
    replayed = cs.wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
    replayed.replay_execution_choices({"layer1..output": {"mode": "packed", "ms": {}}})
    assert "running packed (auto replays the checkpointed choice" in \
        replayed.describe_execution()
    train_step(net, make_input(2, 16))
    assert "no training step" not in net.describe_execution()


def test_a_mode_that_differs_from_the_loop_says_why_the_loop_runs():
    from collabsurgery.graphs.execution.executor import _validate

    group = [torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)]

    def noisy(x):  # a plan whose outputs are not the loop's, as a stage drawing random numbers
        return [m(x) + torch.rand_like(m(x)) for m in group]

    with pytest.raises(Unsupported, match="differed from the loop's .*so the loop runs instead"):
        _validate(noisy, group, make_input(2, 8))


def test_the_environment_variable_adds_overrides_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cli.ENVIRONMENT_OVERRIDES, "train.max_steps=1 detection.epochs=1")
    recipe = tiny_recipe(tmp_path)
    from collabsurgery.config.recipe import save_recipe

    path = save_recipe(recipe, tmp_path / "r.yaml")
    assert cli.main(["train", "--recipe", str(path), "run.name=env", "train.max_steps=5"]) == 0
    err = capsys.readouterr().err
    assert f"{cli.ENVIRONMENT_OVERRIDES} adds: train.max_steps=1" in err
    assert "detection" not in err.split("adds:")[1].splitlines()[0]
    assert (tmp_path / "env" / "checkpoints" / "ckpt-00000001").is_dir()
    assert cli._with_environment(["finetune-detection", "--backbone", "b"],
                                 "finetune-detection")[-2:] == ["--epochs", "1"]


def test_threads_sets_torch_threads(tmp_path, capsys):
    from collabsurgery.config.recipe import save_recipe

    path = save_recipe(tiny_recipe(tmp_path), tmp_path / "r.yaml")
    before = torch.get_num_threads()
    try:
        assert cli.main(["train", "--recipe", str(path), "run.name=t", "train.max_steps=1",
                         "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_timm_folder_of_a_cifar_model_prints_the_import_it_needs(tmp_path, capsys):
    from collabsurgery.train import engine

    run_dir = engine.train(tiny_recipe(tmp_path, "run.name=f", "train.max_steps=1"))
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--head", "0", "--format", "timm-folder", "-o",
                     str(tmp_path / "folder")]) == 0
    assert "load: import collabsurgery.models" in capsys.readouterr().out


@pytest.mark.slow
def test_dropout_views_say_why_their_rows_agree(tmp_path, capsys):
    from collabsurgery.train import engine

    engine.train(tiny_recipe(tmp_path, "run.name=d", "train.epochs=1",
                             "graph={pattern: dropout, samples: 2}",
                             "objective={name: intra, out_weight: 1.0}"))
    assert "(one weight set: the heads are dropout views of one network" in \
        capsys.readouterr().out
