"""Peer groups end to end: students of different architectures, an objective that owns
parameters, exact resume of a 2-student run, per-student views, and user errors.

Runs train on the built-in digits at 16 px (128 examples, batch 16: 8 steps an epoch), on CPU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.config.recipe import load_recipe, save_recipe
from collabsurgery.errors import UserError
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs import PeerGroup
from collabsurgery.models import backbones
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from conftest import TEST_OBJECTIVE
from helpers import (assert_same_logits, calibrate_batchnorm, make_input, one_line_error,
                     stop_then_resume)

OBJECTIVE_KEY = "objective.log_temperature"

STEPS_PER_EPOCH = 8  # 128 training examples / batch 16, drop_last
TINY = ["data.image_size=16", "data.max_train_examples=128", "train.batch_size=16",
        "run.progress=false", "train.epochs=2"]
PEERS = ["graph={pattern: peers}", "model.name=[cifar_resnet20, cifar_resnet20]",
         "objective={name: consensus}"]
MIXED = ["graph={pattern: peers}", "model.name=[cifar_resnet20, torchvision.mobilenet_v2]",
         f"objective={{name: {TEST_OBJECTIVE}}}", "train.epochs=1"]
RANDOM = ["model.kwargs={drop_rate: 0.2}", "data.label_noise=0.2"]  # resume must replay these
MIXED_STOP = 3  # the interrupted mixed run stops after this many optimizer steps


def tiny(run_dir: Path, *overrides: str):
    return load_recipe(None, [*TINY, f"run.dir={run_dir}", *overrides])


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(run_dir / "checkpoints") / "model.safetensors"))


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module", autouse=True)
def _quiet_cpu(one_thread):
    """One thread (conftest), and no Accelerate mixed-precision state left behind."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


# ---------------------------------------------------------------------------- (a) the API

@pytest.fixture(scope="module")
def mixed_peers() -> PeerGroup:
    torch.manual_seed(0)
    net = cs.wrap(["cifar_resnet20", "torchvision.mobilenet_v2"], pattern="peers",
                  num_classes=10, input_size=(3, 32, 32))
    calibrate_batchnorm(net, 32)
    return net.eval()


def test_wrap_peers_of_two_architectures_gives_one_logit_row_per_student(mixed_peers):
    net, x = mixed_peers, make_input(2, 32)
    assert isinstance(net, PeerGroup) and net.num_heads == 2
    assert [net.head_spec(h).qualified_name for h in range(2)] == \
        ["cifar_resnet20", "torchvision.mobilenet_v2"]
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 2, 10)
        for h in range(2):  # head h is student h, the unmodified backbone
            assert torch.equal(out[h], net.students[h](x))
    assert isinstance(net.students[1], torchvision.models.MobileNetV2)


def test_per_head_views_run_student_k_on_view_k(mixed_peers):
    net = mixed_peers
    views = torch.stack([make_input(2, 32, seed=1), make_input(2, 32, seed=2)])
    with torch.no_grad():
        ran = net.run(views, wants=("input",))
        assert ran.logits.shape == (2, 2, 10)
        assert torch.equal(ran.features["input"], views)
        for h in range(2):
            assert torch.equal(ran.logits[h], net.students[h](views[h]))
            # not the other view: the views differ, and so do the student's logits on them
            assert (ran.logits[h] - net.students[h](views[1 - h])).abs().max() > 1e-3


def test_per_head_batch_whose_first_dim_is_not_the_number_of_heads_is_a_user_error(mixed_peers):
    for heads in (1, 3):
        with pytest.raises(UserError, match=r"per-head batch must be \[H=2, B"):
            mixed_peers(torch.stack([make_input(2, 32, seed=s) for s in range(heads)]))


# ---------------------------------------------------------------------------- (a, b) mixed run

@pytest.fixture(scope="module")
def mixed_runs(tmp_path_factory):
    """A cifar_resnet20 + mobilenet_v2 peer run with the learnt-temperature objective: one
    straight epoch, and one stopped after MIXED_STOP steps, then resumed to the same end.
    Records what the resumed session held right after set-up (before any step)."""
    root = tmp_path_factory.mktemp("mixed")
    engine.train(tiny(root, *MIXED, "run.name=straight"))
    engine.train(tiny(root, *MIXED, "run.name=resumed", f"train.max_steps={MIXED_STOP}"))
    run_dir = root / "resumed"
    stopped = checkpoint.latest(run_dir / "checkpoints")
    stopped_weights = load_file(str(stopped / "model.safetensors"))
    stopped_optimizer = checkpoint.load(stopped)[1]["optimizer"]
    resume = tiny(root, *MIXED, "run.name=resumed", "run.resume=auto")
    session = engine.setup(resume)
    collab = session.collaboration
    # the optimizer state's index: parameters numbered group by group (timm's weight-decay
    # groups put 1-d parameters such as the temperature after the others)
    in_order = [p for group in session.optimizer.param_groups for p in group["params"]]
    param_index = next(i for i, p in enumerate(in_order)
                       if p is collab.objective.log_temperature)
    restored = {
        "value": collab.objective.log_temperature.detach().clone(),
        "momentum": session.optimizer.state_dict()["state"][param_index]["momentum_buffer"].clone(),
        "global_step": session.progress.global_step,
    }
    session.accelerator.end_training()
    engine.train(resume)
    return {"root": root, "straight": root / "straight", "resumed": run_dir,
            "stopped": stopped, "stopped_weights": stopped_weights,
            "stopped_momentum": stopped_optimizer["state"][param_index]["momentum_buffer"],
            "restored": restored}


@pytest.mark.parametrize("head_text", ["0", "1", "best", "torchvision.mobilenet_v2"])
@pytest.mark.slow
def test_cli_exports_each_student_as_its_own_architecture_and_load_backbone_rebuilds_it(
        mixed_runs, tmp_path, capsys, head_text):
    run_dir = mixed_runs["resumed"]
    out = tmp_path / f"head-{head_text}.safetensors"
    assert cli.main(["export", str(run_dir), "--head", head_text, "-o", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    net, history = load_run(run_dir)
    head = {"best": history[-1]["holdout"]["best_head"], "torchvision.mobilenet_v2": 1}.get(
        head_text) if not head_text.isdigit() else int(head_text)
    metadata = metadata_of(out)
    assert int(metadata["head"]) == head
    expected = {0: ("timm", "cifar_resnet20"), 1: ("torchvision", "mobilenet_v2")}[head]
    assert (metadata["library"], metadata["architecture"]) == expected
    assert json.loads(metadata["model_kwargs"]) == {"num_classes": 10}

    model = cs.load_backbone(out)  # from the file alone: metadata + strict load
    plain = backbones.create(net.head_spec(head))
    assert type(model) is type(plain)
    assert set(load_file(str(out))) == set(plain.state_dict())  # (safetensors sorts keys)
    x = make_input(4, 16, seed=5)
    with torch.no_grad():
        assert_same_logits(model(x), net(x)[head])


@pytest.mark.slow
def test_objective_parameter_is_trained_checkpointed_restored_and_never_exported(
        mixed_runs, tmp_path):
    stopped, final = mixed_runs["stopped_weights"], latest_weights(mixed_runs["resumed"])
    # trained: the optimizer moved it away from its initial value log(1) = 0
    assert OBJECTIVE_KEY in stopped and OBJECTIVE_KEY in final
    assert stopped[OBJECTIVE_KEY].item() != 0.0
    assert final[OBJECTIVE_KEY].item() != stopped[OBJECTIVE_KEY].item()  # and kept training
    assert [k for k in final if not k.startswith("graph.")] == [OBJECTIVE_KEY]
    # restored on resume: the session held the checkpoint's value and momentum before any step
    restored = mixed_runs["restored"]
    assert restored["global_step"] == MIXED_STOP
    assert torch.equal(restored["value"], stopped[OBJECTIVE_KEY])
    assert torch.equal(restored["momentum"], mixed_runs["stopped_momentum"])
    assert mixed_runs["stopped_momentum"].abs().item() > 0
    # ... so the resumed run ends where the straight one does
    straight = latest_weights(mixed_runs["straight"])
    assert torch.equal(final[OBJECTIVE_KEY], straight[OBJECTIVE_KEY])
    # never exported: every head's file holds exactly its backbone's keys
    net, _ = load_run(mixed_runs["resumed"])
    assert not hasattr(net, "objective")
    for head in range(net.num_heads):
        path = cs.export(net, head=head, path=tmp_path / f"h{head}.safetensors")
        keys = set(load_file(str(path)))
        assert not any("temperature" in k or k.startswith("objective") for k in keys)
        assert keys == set(backbones.create(net.head_spec(head)).state_dict())


# ---------------------------------------------------------------------------- (c) 2-student run

@pytest.fixture(scope="module")
def consensus_straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    recipe = tiny(root, *PEERS, *RANDOM, "run.name=straight", "run.checkpoint_every=5")
    return engine.train(recipe)


@pytest.mark.slow
def test_peer_consensus_run_resumed_mid_epoch_is_bit_identical_to_a_straight_run(
        consensus_straight, tmp_path, capsys):
    run_a = consensus_straight
    same = [*PEERS, *RANDOM, "run.name=resumed", "run.checkpoint_every=5"]
    run_b = tmp_path / "resumed"
    stop_then_resume(lambda *more: tiny(tmp_path, *same, *more), run_b,
                     STEPS_PER_EPOCH + 3, capsys)  # stopped in the middle of epoch 2

    a, b = latest_weights(run_a), latest_weights(run_b)
    assert a.keys() == b.keys() and any(k.startswith("graph.students.1.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
    states_a = checkpoint.load(checkpoint.latest(run_a / "checkpoints"))[1]
    states_b = checkpoint.load(checkpoint.latest(run_b / "checkpoints"))[1]
    assert states_a["scheduler"] == states_b["scheduler"]
    momenta_a, momenta_b = states_a["optimizer"]["state"], states_b["optimizer"]["state"]
    assert momenta_a.keys() == momenta_b.keys() and momenta_a
    assert all(torch.equal(momenta_a[i]["momentum_buffer"], momenta_b[i]["momentum_buffer"])
               for i in momenta_a)
    history_a, history_b = engine.history_of(run_a), engine.history_of(run_b)
    assert len(history_a) == 2 and history_a == history_b
    assert all(len(r["test"]["head_acc"]) == 2 for r in history_a)

    def metrics(run_dir: Path) -> list[dict]:
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert metrics(run_a) == metrics(run_b) == history_a


@pytest.mark.slow
def test_both_students_of_a_peer_run_export_and_reload_with_the_runs_logits(
        consensus_straight, tmp_path, capsys):
    net, _ = load_run(consensus_straight)
    x = make_input(4, 16, seed=6)
    with torch.no_grad():
        graph_logits = net(x)
    assert (graph_logits[0] - graph_logits[1]).abs().max() > 1e-3  # two different students
    for head in (0, 1):
        out = tmp_path / f"student{head}.safetensors"
        assert cli.main(["export", str(consensus_straight), "--head", str(head),
                         "-o", str(out)]) == 0
        model = cs.load_backbone(out)
        assert metadata_of(out)["architecture"] == "cifar_resnet20"
        assert int(metadata_of(out)["head"]) == head
        with torch.no_grad():
            assert_same_logits(model(x), graph_logits[head])
    capsys.readouterr()


@pytest.mark.slow
def test_peer_run_with_per_head_views_trains_each_student_on_its_own_augmentation(
        tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    original = PeerGroup.run

    def run(self, x, wants=()):
        if self.training:
            seen.append(x.detach().clone())
        return original(self, x, wants)

    monkeypatch.setattr(PeerGroup, "run", run)
    run_dir = engine.train(tiny(tmp_path, *PEERS, "data.views=per_head", "train.epochs=1",
                                "run.name=views"))
    assert len(seen) == STEPS_PER_EPOCH
    assert all(x.shape == (2, 16, 3, 16, 16) for x in seen)
    assert all(not torch.equal(x[0], x[1]) for x in seen)  # each student its own view
    (record,) = engine.history_of(run_dir)
    assert math.isfinite(record["train_loss"]) and len(record["test"]["head_acc"]) == 2
    assert json.loads((run_dir / "graph.json").read_text())["kind"] == "peers"


# ---------------------------------------------------------------------------- (d) user errors

@pytest.mark.parametrize("argv, named", [
    # cifar_resnet20 defaults to 10 classes, mobilenet_v2 to 1000
    (["wrap", "cifar_resnet20,torchvision.mobilenet_v2", "--pattern", "peers"],
     "same number of classes"),
    (["wrap", "cifar_resnet20,no_such_model_xyz", "--pattern", "peers", "--num-classes", "10"],
     "no_such_model_xyz"),
    (["wrap", "cifar_resnet20,cifar_resnet20", "--pattern", "peers", "--split", "layer1"],
     "split"),
    # several models are students: only pattern peers takes them
    (["wrap", "cifar_resnet20,cifar_resnet20", "--split", "layer1", "--heads", "2"], "peers"),
    (["wrap", "cifar_resnet20,cifar_resnet20", "--pattern", "instances"], "peers"),
], ids=["different-class-counts", "unknown-peer", "peers-with-split", "two-models-tree",
        "two-models-instances"])
def test_bad_peer_wrap_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                             argv, named):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    line = one_line_error(captured.err)
    assert named in line, line
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_different_class_counts_error_names_each_peer_and_the_fix(capsys):
    assert cli.main(["wrap", "cifar_resnet20,torchvision.mobilenet_v2", "--pattern",
                     "peers"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "cifar_resnet20: 10" in line and "torchvision.mobilenet_v2: 1000" in line
    assert "num_classes" in line


@pytest.mark.parametrize("overrides, named", [
    (["data.views=per_head"], "data.views=per_head"),    # a tree shares layers between heads
    (["objective.bogus=1"], "objective.bogus"),           # consensus takes no 'bogus'
    (["model.name=[cifar_resnet20, cifar_resnet20]"], "peers"),  # students need peers
    (["graph={pattern: peers}", "model.name=[cifar_resnet20, cifar_resnet32]",
      "data.views=per_head", "data.augment=false"], "data.augment"),  # views would be equal
    (["graph={pattern: peers}", "model.name=[cifar_resnet20]"], "at least two models"),
], ids=["per-head-views-with-tree", "unknown-objective-argument", "two-models-tree",
        "per-head-views-without-augmentation", "peer-group-of-one"])
def test_bad_train_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, overrides,
                                                                named):
    runs = tmp_path / "runs"
    recipe_file = save_recipe(tiny(runs, "graph.heads=2", "graph.split=[layer1]",
                                   "train.epochs=1"), tmp_path / "recipe.yaml")
    assert cli.main(["train", "--recipe", str(recipe_file), *overrides]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert named in line, line
    assert not runs.exists()


def test_unknown_objective_argument_is_refused_when_the_recipe_loads():
    with pytest.raises(UserError, match="objective.bogus.*valid keys.*temperature"):
        load_recipe(None, ["objective={name: consensus}", "objective.bogus=1"])
    with pytest.raises(UserError, match="objective.bogus"):
        load_recipe(None, [f"objective={{name: {TEST_OBJECTIVE}}}", "objective.bogus=1"])


def test_a_head_name_shared_by_two_students_or_unknown_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "peers.safetensors"
    assert cli.main(["wrap", "cifar_resnet20,cifar_resnet20", "--pattern", "peers",
                     "--input-size", "16", "--save", str(path)]) == 0
    capsys.readouterr()
    for head, match in (("cifar_resnet20", "names 2 heads; give an index: 0=cifar_resnet20"),
                        ("resnet18", "valid: best or 0..1")):
        assert cli.main(["export", str(path), "--head", head, "-o", str(tmp_path / "x")]) == 2
        assert match in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.safetensors"]
