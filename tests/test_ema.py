"""EMA weights (train.ema_decay, train.ema_warmup, train.ema_select): timm's ModelEmaV3 over the
training graph, updated after every optimizer update with the global step; evaluated each
epoch, checkpointed as ema.safetensors, resumed bit-exactly, selected and exported (--ema).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from collabsurgery import cli
from collabsurgery.config.recipe import TrainConfig, data_arguments
from collabsurgery.data.datasets import load_splits
from collabsurgery.errors import UserError
from collabsurgery.graphs import rebuild
from collabsurgery.graphs.saving import config_from_json
from collabsurgery.rundir import checkpoint, metrics
from collabsurgery.train import ema as weight_ema
from collabsurgery.train import engine

from helpers import (RANDOM_OVERRIDES, assert_close_scaled, assert_same_logits,
                     assert_same_weights, latest_weights, one_line_error, stop_then_resume,
                     tiny_recipe)

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")

DECAY = 0.9
#: EMA with timm's warm-up, chosen for selection and export; RANDOM_OVERRIDES make the resume
#: replay dropout masks and noisy labels; mid-epoch checkpoints
EMA_OVERRIDES = [*RANDOM_OVERRIDES, f"train.ema_decay={DECAY}", "train.ema_warmup=true",
                 "train.ema_select=true", "run.checkpoint_every=5"]


def hand_decay(step: int, decay: float, warmup: bool) -> float:
    """ModelEmaV3.get_decay(step) written out: 0 at the first update, then the decay (with
    warm-up ``1 - (1 + s)^(-2/3)``, s = step - 1, capped at ``decay``)."""
    s = step - 1
    if s <= 0:
        return 0.0
    return min(1 - (1 + s) ** (-2 / 3), decay) if warmup else decay


def hand_ema(updates: list[tuple[int, dict[str, torch.Tensor]]], decay: float, warmup: bool
             ) -> dict[str, torch.Tensor]:
    """The EMA of the weights after each update (float64; integer tensors: the last value)."""
    ema: dict[str, torch.Tensor] = {}
    for step, weights in updates:
        d = hand_decay(step, decay, warmup)
        for key, w in weights.items():
            if not w.is_floating_point():
                ema[key] = w.clone()
            elif key not in ema:
                ema[key] = w.double() * (1 - d)  # d is 0 at step 1: a copy
            else:
                ema[key] = d * ema[key] + (1 - d) * w.double()
    return ema


def assert_is_hand_ema(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                       ) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert_close_scaled(actual[key], value, key, rtol=1e-5)
        else:
            assert torch.equal(actual[key], value), key


# ---------------------------------------------------------------------------- the formula

@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_hand_computed_moving_average(warmup):
    """Five updates of a module with a parameter, a float buffer and an integer buffer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = weight_ema.build(net, TrainConfig(ema_decay=DECAY, ema_warmup=warmup))
    assert weight_ema.build(net, TrainConfig()) is None  # ema_decay null: off
    updates = []
    for step in range(1, 6):
        with torch.no_grad():  # an optimizer step, and a BatchNorm statistics update
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.train()(torch.randn(8, 3))
        weight_ema.update(ema, net, step)
        updates.append((step, {k: v.clone() for k, v in net.state_dict().items()}))
        assert ema.get_decay(step) == pytest.approx(hand_decay(step, DECAY, warmup), abs=1e-12)
    assert_is_hand_ema(weight_ema.state(ema), hand_ema(updates, DECAY, warmup))
    assert weight_ema.state(ema)["1.num_batches_tracked"] == 5
    # the decays differ: with warm-up step 2 is 1 - 2^(-2/3) = 0.37, without it 0.9
    assert hand_decay(2, DECAY, True) == pytest.approx(1 - 2 ** (-2 / 3))
    assert hand_decay(100, DECAY, True) == DECAY


def test_ema_select_without_ema_decay_is_one_line_exit_2(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  ema_select: true\nrun:\n  dir: {tmp_path / 'runs'}\n")
    assert cli.main(["train", "--recipe", str(recipe)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "train.ema_select" in line and "train.ema_decay" in line
    assert not (tmp_path / "runs").exists()  # found before anything is written
    weight_ema.check(TrainConfig(ema_select=True, ema_decay=0.99))


# ---------------------------------------------------------------------------- a run with EMA

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs (16 optimizer steps) with EMA, recording the graph's weights at every EMA
    update; shared by the tests below (read only)."""
    root = tmp_path_factory.mktemp("ema")
    updates: list[tuple[int, dict[str, torch.Tensor]]] = []
    original = weight_ema.update

    def recording(ema, graph, step):
        updates.append((step, {k: v.detach().clone() for k, v in graph.state_dict().items()}))
        original(ema, graph, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weight_ema, "update", recording)
        recipe = tiny_recipe(root, *EMA_OVERRIDES, "run.name=straight")
        run_dir = engine.train(recipe)
    return recipe, run_dir, updates


def latest_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(run_dir / "checkpoints") / checkpoint.EMA))


@pytest.mark.slow
def test_the_engine_updates_the_ema_after_every_optimizer_step(straight):
    _, run_dir, updates = straight
    assert [step for step, _ in updates] == list(range(1, 17))  # the global optimizer steps
    assert_is_hand_ema(latest_ema(run_dir), hand_ema(updates, DECAY, warmup=True))
    live = {k.removeprefix("graph."): v for k, v in latest_weights(run_dir).items()
            if k.startswith("graph.")}
    assert_same_weights(live, updates[-1][1])  # the live weights are the last ones averaged
    ema = latest_ema(run_dir)
    assert any(not torch.equal(ema[k], v) for k, v in live.items() if v.is_floating_point())


@pytest.mark.slow
def test_every_epoch_record_holds_the_ema_evaluation(straight):
    _, run_dir, _ = straight
    history = engine.history_of(run_dir)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == history and len(history) == 2
    for record in history:
        for split in ("holdout", "test"):
            ema, live = record["ema"][split], record[split]
            assert len(ema["head_acc"]) == 2 and 0 <= ema["ensemble_acc"] <= 1
            assert ema["examples"] == live["examples"]
    # ema_select: the run's headline (summary.json) is the EMA weights'
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_head"] == history[-1]["ema"]["holdout"]["best_head"]
    assert {k: summary[k] for k in metrics.headline(history[-1])} == \
        metrics.headline(history[-1], ema=True)
    # listed and verified like every other checkpoint file
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    assert checkpoint.EMA in checkpoint.verify(ckpt)["files"]
    assert "ema" in checkpoint.load(ckpt)[1]
    scalars = metrics.flat_scalars(history[-1])
    assert {"ema/test/head0_acc", "ema/holdout/ensemble_acc"} <= set(scalars)


@pytest.mark.slow
def test_a_resumed_run_has_bit_identical_ema_weights(straight, tmp_path, capsys):
    _, run_a, _ = straight
    run_b = tmp_path / "resumed"
    stop_then_resume(lambda *more: tiny_recipe(tmp_path, *EMA_OVERRIDES, "run.name=resumed",
                                               *more), run_b, 5, capsys)
    assert_same_weights(latest_ema(run_b), latest_ema(run_a))
    assert_same_weights(latest_weights(run_b), latest_weights(run_a))
    assert engine.history_of(run_b) == engine.history_of(run_a)  # EMA records included


@pytest.mark.slow
def test_export_ema_loads_strictly_and_gives_the_ema_heads_logits(straight, tmp_path, capsys):
    recipe, run_dir, _ = straight
    history = engine.history_of(run_dir)
    best = history[-1]["ema"]["holdout"]["best_head"]
    out = tmp_path / "ema.safetensors"
    assert cli.main(["export", str(run_dir), "--ema", "--head", "best", "-o", str(out)]) == 0
    assert f"exported head {best} of the EMA weights" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["weights"] == "ema" and int(metadata["head"]) == best
    ema_test = history[-1]["ema"]["test"]["head_acc"][best]
    assert json.loads(metadata["metrics"])["test_acc"] == ema_test

    model = timm.create_model(recipe.model.name, num_classes=10)
    model.load_state_dict(load_file(str(out)), strict=True)
    ema_graph = rebuild(config_from_json((run_dir / "graph.json").read_text()))
    ema_graph.load_state_dict(latest_ema(run_dir), strict=True)
    test = load_splits(**data_arguments(recipe.data), seed=recipe.seed).test
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        assert_same_logits(model.eval()(images), ema_graph.eval()(images)[best])

    # ema_select: the default export is the EMA one; --live exports the trained weights
    default, live = tmp_path / "default.safetensors", tmp_path / "live.safetensors"
    assert cli.main(["export", str(run_dir), "--head", str(best), "-o", str(default)]) == 0
    assert cli.main(["export", str(run_dir), "--live", "--head", str(best), "-o", str(live)]) == 0
    assert_same_weights(load_file(str(default)), load_file(str(out)))
    live_graph = rebuild(config_from_json((run_dir / "graph.json").read_text()))
    live_graph.load_state_dict(checkpoint.split_state(latest_weights(run_dir))[0])
    assert_same_weights(load_file(str(live)), live_graph.head_state_dict(best))
    live_weights, ema_weights = load_file(str(live)), load_file(str(out))
    assert not torch.equal(live_weights["conv1.weight"], ema_weights["conv1.weight"])


# ---------------------------------------------------------------------------- a run without EMA

@pytest.mark.slow
def test_export_ema_of_a_run_without_ema_is_one_line_exit_2(tmp_path, capsys):
    run_dir = engine.train(tiny_recipe(tmp_path, "run.name=plain", "train.max_steps=1"))
    out = tmp_path / "out.safetensors"
    for fmt in ("safetensors", "timm-folder"):
        code = cli.main(["export", str(run_dir), "--ema", "--head", "0", "-o", str(out),
                         "--format", fmt])
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and "no EMA weights" in line and "train.ema_decay" in line
        assert not out.exists()
    # resuming it with EMA switched on would average from the middle: refused (the recipe
    # differs from the run's record)
    with pytest.raises(UserError, match=r"train.ema_decay=0.9 \(was None\)"):
        engine.setup(tiny_recipe(tmp_path, "run.name=plain", "run.resume=auto",
                                 "train.ema_decay=0.9"))
