"""timm's training toolbox in the engine: Mixup/CutMix and label smoothing on every data mode,
drawn per (seed, epoch, batch); a resumed run with adamw, cosine warm-up, mixup and EMA is
bit-identical; torch.compile in training equals eager; bad settings are one line, exit 2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup

from collabsurgery.common.seeding import derive_seed
from collabsurgery.config.recipe import load_recipe
from collabsurgery.train import engine
from collabsurgery.train.soft_targets import SoftTargets
from helpers import (REPO, assert_same_weights, latest_weights, one_line_error, run_cli,
                     stop_then_resume, tiny_recipe)

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")

MIX = ["train.mixup=0.8", "train.cutmix=1.0", "train.label_smoothing=0.1"]


def toolbox(*overrides: str):
    return load_recipe(None, [*MIX, *overrides]).train


def batch(shape=(8, 3, 16, 16), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, classes, shape[:1], generator=g)


def test_soft_targets_are_timms_mixup_with_the_step_draw():
    soft = SoftTargets(toolbox(), 10)
    x, y = batch()
    mixed, targets = soft(x.clone(), y, 0, 3, 7)
    np.random.seed(derive_seed("mixup", 0, 3, 7) % 2**32)
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    x_ref, t_ref = reference(x.clone(), y)
    assert torch.equal(mixed, x_ref) and torch.equal(targets, t_ref)
    assert targets.shape == (8, 10) and torch.allclose(targets.sum(-1), torch.ones(8))
    again, again_t = soft(x.clone(), y, 0, 3, 7)  # a replay (resume) draws the same
    assert torch.equal(again, mixed) and torch.equal(again_t, targets)
    other, _ = soft(x.clone(), y, 0, 3, 8)        # another batch draws anew
    assert not torch.equal(other, mixed)


def test_per_head_views_share_one_draw_and_one_target():
    soft = SoftTargets(toolbox(), 10)
    x, y = batch()
    views = torch.stack([x, x + 1, x * 2])          # [H, B, ...]: each head its own view
    mixed, targets = soft(views.clone(), y, 0, 0, 0)
    one, one_t = soft(x.clone(), y, 0, 0, 0)
    assert targets.shape == (8, 10) and torch.equal(targets, one_t)
    assert torch.equal(mixed[0], one)
    # the same pairs and coefficient on every view: mixing is linear in the view
    assert torch.allclose(mixed[1], one + 1, atol=1e-6)


def test_per_head_subsets_get_per_head_targets():
    soft = SoftTargets(toolbox(), 10)
    x, _ = batch((3, 8, 3, 16, 16))
    y = torch.randint(0, 10, (3, 8), generator=torch.Generator().manual_seed(1))
    mixed, targets = soft(x.clone(), y, 0, 0, 0)
    assert mixed.shape == x.shape and targets.shape == (3, 8, 10)
    for h in range(3):
        _, t_h = soft(x[h].clone(), y[h], 0, 0, 0)
        assert torch.equal(targets[h], t_h)


def test_smoothing_alone_is_the_hand_formula():
    soft = SoftTargets(load_recipe(None, ["train.label_smoothing=0.2"]).train, 5)
    x, _ = batch((4, 3, 8, 8))
    y = torch.tensor([0, 4, 2, 2])
    same_x, targets = soft(x, y, 0, 0, 0)
    expected = torch.full((4, 5), 0.2 / 5)
    expected[torch.arange(4), y] += 0.8
    assert same_x is x and torch.allclose(targets, expected)


@pytest.mark.slow
def test_resume_is_bit_exact_with_the_toolbox_on(tmp_path, capsys):
    """adamw + cosine with warm-up + Mixup/CutMix + smoothing + EMA: stopped mid-epoch and
    resumed, the run ends with the weights, EMA and history of a straight run."""
    on = [*MIX, "train.optimizer=adamw", "train.lr=0.002", "train.weight_decay=0.05",
          "train.warmup_epochs=1", "train.warmup_lr=1e-4", "train.ema_decay=0.9",
          "train.ema_warmup=true", "run.checkpoint_every=3", "graph.execution=packed"]
    run_a = engine.train(tiny_recipe(tmp_path, *on, "run.name=straight"))
    run_b = tmp_path / "resumed"
    stop_then_resume(lambda *more: tiny_recipe(tmp_path, *on, "run.name=resumed", *more),
                     run_b, 5, capsys)
    assert_same_weights(latest_weights(run_b), latest_weights(run_a))
    assert engine.history_of(run_b) == engine.history_of(run_a)
    history = engine.history_of(run_a)
    assert all(np.isfinite(r["train_loss"]) for r in history) and "ema" in history[-1]


@pytest.mark.parametrize("recipe,overrides,expected", [
    ("demo-kdcl", ["train.mixup=0.2", "objective.target=minlogit"],
     "objective 'kdcl' cannot take them: kdcl target 'minlogit'"),
    ("demo", ["train.cutmix=1.0", "train.batch_size=15"], "train.batch_size=15 is odd"),
    ("demo", ["objective.name=label_smoothing", "objective.temperature=null",
              "objective.beta=null", "train.label_smoothing=0.1"], "smooth the labels twice"),
    ("demo", ["train.optimizer=sgdw2"], "'train.optimizer' is 'sgdw2', which timm does not"),
    ("demo", ["train.schedule=linear"], "'train.schedule' is 'linear'; valid (timm's names)"),
    ("demo", ["train.compile={backend: no_such_backend}"], "torch.compile cannot run here"),
])
def test_bad_toolbox_settings_are_one_line_exit_2(tmp_path, capsys, recipe, overrides, expected):
    code = run_cli(["train", "--recipe", REPO / f"recipes/{recipe}.yaml", f"run.dir={tmp_path}",
                    "data.max_train_examples=64", "train.batch_size=16", *overrides])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and expected in line, line
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_a_routed_graph_refuses_compile(tmp_path, capsys):
    code = run_cli(["train", "--recipe", REPO / "recipes/demo-cgl.yaml", f"run.dir={tmp_path}",
                    "train.compile={backend: aot_eager}"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "a routed graph is not compiled" in line, line


def _step_grads(recipe, compile_options):
    torch.manual_seed(0)
    net = engine.Collaboration(engine.build_net(recipe, 10), engine.build_objective_from(recipe))
    net.objective.attach(net.graph)
    if compile_options:
        net.graph.set_execution(compile=compile_options)
    x, y = batch((8, 3, 16, 16))
    loss = net(x, y, None).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("graph", [["graph.heads=2", "graph.split=[layer1]",
                                    "graph.execution=loop"],
                                   ["graph.pattern=peers", "graph.split=null",
                                    "graph.heads=null", "graph.branches=null",
                                    "graph.rescale=null", "objective.name=dml",
                                    "objective.temperature=null", "objective.beta=null",
                                    "model.name=[cifar_resnet20, cifar_resnet20]"]])
def test_compiled_step_equals_eager(graph):
    """inductor on the CPU (regional: each stage's plan, or each student) against eager: the
    same loss and gradients within float tolerance."""
    recipe = load_recipe(None, ["model.name=cifar_resnet20", "data.image_size=16", *graph])
    eager_loss, eager = _step_grads(recipe, False)
    torch.compiler.reset()
    compiled_loss, compiled = _step_grads(recipe, True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert compiled.keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_resume_with_compile_on(tmp_path, capsys):
    """A compiled run stopped mid-way and resumed trains on to the same weights as a compiled
    straight run (the checkpoint holds plain weights: compilation is not in the state)."""
    on = ["train.compile=true", "graph.execution=loop", "data.max_train_examples=64",
          "train.epochs=1"]
    run_a = engine.train(tiny_recipe(tmp_path, *on, "run.name=straight"))
    run_b = tmp_path / "resumed"
    stop_then_resume(lambda *more: tiny_recipe(tmp_path, *on, "run.name=resumed", *more),
                     run_b, 2, capsys)
    a, b = latest_weights(run_a), latest_weights(run_b)
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
