"""Paper 002's robustness measure (Fig. 6): accuracy under Gaussian noise on the weights, as a
library call on a small model and as ``collabsurgery evaluate RUN --perturb`` on a trained run."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import run_cli as run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.measure.robustness import noise_generator, perturbation_curve, perturbed
from collabsurgery.train import engine

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def teacher() -> tuple[nn.Module, DataLoader]:
    """A small MLP with BatchNorm (running statistics of one train-mode batch, so they are not
    the defaults) and data it labels itself: unperturbed accuracy 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(400, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(x)
        labels = model.eval()(x).argmax(-1)
    return model, DataLoader(TensorDataset(x, labels), batch_size=128)


def test_noise_is_absolute_sigma_on_every_parameter_and_no_buffer(teacher):
    model, _ = teacher
    with torch.no_grad():
        model[0].weight.mul_(10)  # a tensor of another scale gets the same absolute noise
    before = _state(model)
    with perturbed(model, 0.1, noise_generator(0, 0.1, 0)):
        after = model.state_dict()
        for name, p in model.named_parameters():
            diff = after[name] - before[name]
            assert (diff != 0).all(), name
            if diff.numel() >= 500:
                assert diff.std().item() == pytest.approx(0.1, rel=0.1), name
        for name, b in model.named_buffers():
            assert torch.equal(b, before[name]), name


def test_weights_and_buffers_are_restored_bit_exactly(teacher):
    model, loader = teacher
    model.train()
    before, params = _state(model), [id(p) for p in model.parameters()]
    perturbation_curve(model, loader, [0.05, 1.0], draws=2)
    with pytest.raises(RuntimeError, match="inside"):
        with perturbed(model, 1.0, noise_generator(0, 1.0, 0)):
            raise RuntimeError("inside")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert [id(p) for p in model.parameters()] == params  # the same tensors, optimizers keep them
    assert model.training


def test_a_tiny_sigma_keeps_the_accuracy(teacher):
    model, loader = teacher
    result = perturbation_curve(model, loader, [1e-9], draws=3)
    assert result["clean_acc"] == 1.0
    (row,) = result["curve"]
    assert row["accs"] == [1.0] * 3 and row["drop"] == 0 and row["std_acc"] == 0


def test_the_same_seed_gives_the_same_numbers_and_draws_differ(teacher):
    model, loader = teacher
    first = perturbation_curve(model, loader, [0.1, 0.3], draws=4, seed=0)
    assert perturbation_curve(model, loader, [0.1, 0.3], draws=4, seed=0) == first
    for row in first["curve"]:
        assert len(set(row["accs"])) > 1, row  # draws are different noise
        assert row["mean_acc"] < 1 and row["drop"] == pytest.approx(1 - row["mean_acc"])
        assert row["std_acc"] == pytest.approx(torch.tensor(row["accs"]).std().item())
    assert perturbation_curve(model, loader, [0.1, 0.3], draws=4, seed=1) != first
    # a draw is keyed by sigma's value, not its place in the list
    alone = perturbation_curve(model, loader, [0.3], draws=4, seed=0)
    assert alone["curve"][0] == first["curve"][1]


@pytest.mark.parametrize("sigmas,draws,match", [
    ([0.0], 5, "sigma 0.0 is not valid"), ([0.1, -0.1], 5, "sigma -0.1"),
    ([math.nan], 5, "sigma nan"), ([math.inf], 5, "sigma inf"), ([], 5, "sigma list"),
    ([0.1], 0, "draws 0"), ([0.1], 1.5, "draws 1.5"),
])
def test_bad_sigmas_or_draws_are_a_user_error(teacher, sigmas, draws, match):
    model, loader = teacher
    with pytest.raises(UserError, match=match):
        perturbation_curve(model, loader, sigmas, draws=draws)


# ------------------------------------------------------------------ the CLI on a trained run

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two heads trained for 3 short epochs on 8 px digits: about 0.8 test accuracy."""
    root = tmp_path_factory.mktemp("runs")
    return engine.train(load_recipe(None, [
        "data.image_size=8", "data.max_train_examples=128", "data.augment=false",
        "train.batch_size=16", "train.epochs=3", "train.lr=0.05", "model.name=cifar_resnet20",
        "graph.heads=2", "graph.split=[layer1]", "run.progress=false", f"run.dir={root}",
        "run.name=tiny"]))


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


@pytest.mark.slow
def test_evaluate_perturb_writes_json_and_png_and_larger_sigma_lowers_accuracy(trained,
                                                                                capsys):
    assert run(["evaluate", trained, "--perturb", "0.001,0.05,0.5", "--draws", "2"]) == 0
    out = capsys.readouterr().out
    assert "sigma" in out and "drop" in out and "robustness.json" in out
    result = json.loads((trained / "robustness.json").read_text())
    last = engine.history_of(trained)[-1]
    head = last["holdout"]["best_head"]
    assert result["head"] == head and result["draws"] == 2 and result["examples"] == 359
    # the plain backbone is the training graph's head: the accuracy training recorded
    assert result["clean_acc"] == pytest.approx(last["test"]["head_acc"][head], abs=1e-9)
    assert result["clean_acc"] > 0.6
    tiny, medium, large = (row["mean_acc"] for row in result["curve"])
    assert tiny == pytest.approx(result["clean_acc"], abs=0.03)
    assert large < medium < result["clean_acc"] - 0.2
    assert [row["sigma"] for row in result["curve"]] == [0.001, 0.05, 0.5]
    assert (trained / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in trained.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_evaluate_without_perturb_prints_the_accuracy_and_writes_nothing(trained, capsys):
    before = _files(trained)
    assert run(["evaluate", trained, "--head", "1"]) == 0
    out = capsys.readouterr().out
    recorded = engine.history_of(trained)[-1]["test"]["head_acc"][1]
    assert "head 1 (cifar_resnet20)" in out and f"test accuracy {recorded:.4f}" in out
    assert _files(trained) == before


@pytest.mark.parametrize("extra,match", [
    (["--perturb", "0"], r"sigma 0\.0 is not valid"),
    (["--perturb", "0.01,-0.02"], r"sigma -0\.02"),
    (["--perturb", "abc"], "comma-separated numbers"), (["--perturb", "0.1,"], "numbers > 0"),
    (["--perturb", "nan"], "sigma nan"), (["--perturb", "0.1", "--draws", "0"], "integer >= 1"),
    (["--perturb", "0.1", "--draws", "two"], "integer >= 1"),
    (["--perturb", "0.1", "--head", "7"], r"head '7' out of range; valid: best or 0\.\.1"),
])
@pytest.mark.slow
def test_evaluate_bad_input_is_one_line_exit_2_and_writes_nothing(trained, extra, match, capsys):
    before = _files(trained)
    assert run(["evaluate", trained, *extra]) == 2
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("collabsurgery") and "error: " in lines[0]
    assert re.search(match, lines[0]), lines[0]
    assert _files(trained) == before


def test_evaluate_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert run(["evaluate", tmp_path, "--perturb", "0.1"]) == 2
    assert "is not a training run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigmas_that_overflow_the_weights_dtype_are_refused():
    """Noise beyond the weights' dtype would make every weight infinite and the curve
    meaningless (issue 30): refused in one line, before any evaluation."""
    from collabsurgery.measure.robustness import check_sigmas

    assert check_sigmas([0.01, 1e30], torch.float32) == (0.01, 1e30)
    with pytest.raises(UserError, match=r"sigma 1e\+308 overflows the model's float32 weights"):
        check_sigmas([0.01, 1e308], torch.float32)
    with pytest.raises(UserError, match=r"sigma 10000 overflows the model's float16 weights"):
        check_sigmas([1e4], torch.float16)
    with pytest.raises(UserError, match="overflows"):
        perturbation_curve(nn.Linear(2, 2), [], [1e38])  # refused before the loader is read
