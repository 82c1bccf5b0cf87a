"""timm's optimizers and schedulers in the engine: the existing recipes keep their learning-rate
curves and optimizer behaviour, timm's names work, and their state resumes exactly."""
from __future__ import annotations

import math

import pytest
import torch

from collabsurgery.config.recipe import load_recipe
from collabsurgery.errors import UserError
from collabsurgery.rundir.training_state import load_state, save_state
from collabsurgery.train.engine import Collaboration, build_net, build_objective_from
from collabsurgery.train.optim import current_lr, make_optimizer, make_schedule
from helpers import REPO

PAPER = REPO / "recipes/cifar10-resnet32-clilr-hier4.yaml"  # multistep [100, 150, 192]
DEMO = REPO / "recipes/demo.yaml"                            # cosine, 1 warm-up epoch


def old_lr_factor(step: int, steps_per_epoch: int, t) -> float:
    """The engine's learning-rate multiplier before it used timm (a LambdaLR), verbatim."""
    epoch = step / steps_per_epoch
    if epoch < t.warmup_epochs:
        return (epoch + 1 / steps_per_epoch) / t.warmup_epochs
    if t.schedule == "cosine":
        span = max(t.epochs - t.warmup_epochs, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - t.warmup_epochs) / span, 1.0)))
    if t.schedule in ("step", "multistep"):
        return t.gamma ** sum(epoch >= m for m in t.milestones)
    return 1.0


def old_optimizer(module: torch.nn.Module, t) -> torch.optim.Optimizer:
    """The engine's optimizer before it used timm, verbatim."""
    if t.optimizer == "adam":
        return torch.optim.Adam(module.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(module.parameters(), lr=t.lr, momentum=t.momentum,
                           nesterov=t.nesterov and t.momentum > 0, weight_decay=t.weight_decay)


def lr_curve(t, steps_per_epoch: int) -> list[float]:
    """The learning rate of every optimizer update of ``t.epochs`` epochs, as the engine sets
    it (one scheduler call after each update)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    schedule = make_schedule(optimizer, t, steps_per_epoch)
    lrs = []
    for update in range(t.epochs * steps_per_epoch):
        lrs.append(current_lr(optimizer))
        schedule.after_update(update + 1)
    return lrs


@pytest.mark.parametrize("path,overrides", [
    (PAPER, []), (DEMO, ["train.warmup_epochs=0"]),
    (DEMO, ["train.schedule=constant", "train.warmup_epochs=0"])])
def test_schedule_without_warmup_is_todays_curve(path, overrides):
    t = load_recipe(path, overrides).train
    spe = 7
    new = lr_curve(t, spe)
    old = [t.lr * old_lr_factor(s, spe, t) for s in range(len(new))]
    assert new == pytest.approx(old, rel=1e-12, abs=1e-15)


def test_demo_warmup_is_timms_ramp_then_todays_curve():
    t = load_recipe(DEMO).train
    assert t.warmup_epochs == 1 and t.warmup_lr == 0.0
    spe = 9
    new = lr_curve(t, spe)
    old = [t.lr * old_lr_factor(s, spe, t) for s in range(len(new))]
    # timm's ramp: warmup_lr on update 0, lr on update N; the old ramp was one update earlier
    assert new[:spe] == pytest.approx([t.lr * s / spe for s in range(spe)], rel=1e-12)
    assert new[1:spe] == pytest.approx(old[:spe - 1], rel=1e-12)
    assert new[spe:] == pytest.approx(old[spe:], rel=1e-12, abs=1e-15)


def test_paper_warmup_starts_at_warmup_lr():
    t = load_recipe(REPO / "recipes/imagenet-resnet50-resnet18-kdcl.yaml").train
    lrs = lr_curve(t, 3)
    assert lrs[0] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.8)
    assert lrs[60 * 3 - 1] == pytest.approx(0.8) and lrs[60 * 3] == pytest.approx(0.08)


@pytest.mark.parametrize("path", [PAPER, DEMO])
def test_first_steps_weights_equal_todays(path, one_thread):
    """Same graph and objective, same batches: timm's optimizer and schedule (with the recipe's
    decay_norm_and_bias) give the weights the old SGD + LambdaLR gave, bit for bit on the
    paper recipe (multistep: the same lr floats) and to rounding on the cosine demo."""
    fixed = ["model.name=cifar_resnet20", "graph.execution=loop"]  # no timing-based choice
    recipe = load_recipe(path, fixed + (["train.warmup_epochs=0"] if path == DEMO else []))
    t, spe = recipe.train, 5
    weights = []
    for use_timm in (False, True):
        torch.manual_seed(0)
        module = Collaboration(build_net(recipe, 10), build_objective_from(recipe))
        module.objective.attach(module.graph)
        if use_timm:
            optimizer = make_optimizer(module, t)
            schedule = make_schedule(optimizer, t, spe)
            after = schedule.after_update
        else:
            optimizer = old_optimizer(module, t)
            lam = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                    lambda s: old_lr_factor(s, spe, t))
            after = lambda _: lam.step()  # noqa: E731
        g = torch.Generator().manual_seed(1)
        for update in range(3):
            x = torch.randn(8, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            module(x, y, None).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after(update + 1)
        weights.append(module.state_dict())
    for key, old in weights[0].items():
        if path == PAPER:
            assert torch.equal(weights[1][key], old), key
        else:
            torch.testing.assert_close(weights[1][key], old, rtol=1e-6, atol=1e-7)


def test_decay_norm_and_bias_false_is_timms_groups():
    """The default (as timm): no weight decay on norm weights and biases."""
    recipe = load_recipe(DEMO, ["train.decay_norm_and_bias=false", "model.name=cifar_resnet20"])
    net = build_net(recipe, 10)
    optimizer = make_optimizer(net, recipe.train)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


@pytest.mark.parametrize("name,kind", [("adamw", torch.optim.AdamW), ("momentum", torch.optim.SGD),
                                       ("lion", None), ("lamb", None)])
def test_timm_optimizer_names(name, kind):
    t = load_recipe(DEMO, [f"train.optimizer={name}"]).train
    optimizer = make_optimizer(torch.nn.Linear(3, 2), t)
    if kind is not None:
        assert type(optimizer) is kind
    assert optimizer.param_groups[0]["lr"] == t.lr


@pytest.mark.parametrize("schedule,extra", [
    ("step", ["train.decay_epochs=2"]), ("poly", []), ("tanh", []),
    ("plateau", ["train.scheduler_args={patience_epochs: 3}"]),
    ("cosine", ["train.scheduler_args={cycle_limit: 2}"])])
def test_schedule_state_resumes_exactly(tmp_path, schedule, extra):
    """A schedule's state (timm's, and the plateau counters timm does not keep) survives the
    pickle-free state file: a restored schedule continues exactly."""
    t = load_recipe(DEMO, [f"train.schedule={schedule}", "train.warmup_epochs=1", *extra]).train

    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
        return opt, make_schedule(opt, t, 4)

    def advance(opt, sched, updates, start=0):
        out = []
        for u in range(start, start + updates):
            sched.after_update(u + 1)
            if (u + 1) % 4 == 0:
                sched.after_epoch((u + 1) // 4, metric=0.5)  # plateau: no improvement
            out.append(current_lr(opt))
        return out

    opt, sched = fresh()
    straight = advance(opt, sched, 40)
    opt, sched = fresh()
    advance(opt, sched, 12)  # mid-patience for plateau: its counters must be kept
    save_state({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
               tmp_path / "s.safetensors")
    state = load_state(tmp_path / "s.safetensors")
    opt, sched = fresh()
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert advance(opt, sched, 28, start=12) == straight[12:]
    if schedule == "plateau":
        assert straight[-1] < t.lr  # the patience ran out: the counters were kept


@pytest.mark.parametrize("override,expected", [
    ("train.optimizer=adamx", "'train.optimizer' is 'adamx', which timm does not know; valid: "),
    ("train.schedule=cosin", "'train.schedule' is 'cosin'; valid (timm's names): cosine, tanh"),
    ("train.schedule=step", "'train.decay_epochs' is unset"),
])
def test_bad_names_are_one_line(override, expected):
    with pytest.raises(UserError, match="recipe key") as err:
        load_recipe(DEMO, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_optimizer_args_that_do_not_fit_are_one_line():
    t = load_recipe(DEMO, ["train.optimizer_args={foo: 1}"]).train
    with pytest.raises(UserError, match="train.optimizer_args"):
        make_optimizer(torch.nn.Linear(2, 2), t)


def test_a_checkpoint_from_before_timm_resumes_its_schedule():
    """A run checkpointed by the old LambdaLR engine continues at its update count."""
    t = load_recipe(PAPER).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: old_lr_factor(s, 7, t))
    for _ in range(100 * 7 + 3):
        old.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    schedule = make_schedule(opt2, t, 7)
    schedule.load_state_dict(old.state_dict())
    assert current_lr(opt2) == pytest.approx(old.get_last_lr()[0]) == pytest.approx(t.lr * 0.1)
