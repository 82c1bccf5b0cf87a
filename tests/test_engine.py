"""The training engine end to end on the built-in digits, kept tiny (16 px, 128 examples).

Exact resume, atomic checkpoints, a real 2-process run, non-finite losses, what a run writes,
recipe and data errors through the CLI, export from a run, bf16 and loss rescaling.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collabsurgery import cli
from collabsurgery.config.recipe import data_arguments, load_recipe, save_recipe
from collabsurgery.data.datasets import load_splits
from collabsurgery.export.from_run import load_run
from collabsurgery.graphs.execution import executor as execution
from collabsurgery.objectives.consensus import ConsensusLoss
from collabsurgery.rundir import checkpoint, training_state
from collabsurgery.train import engine

from helpers import (RANDOM_OVERRIDES, assert_same_logits, latest_weights, one_line,
                     one_line_error, stop_then_resume, tiny_recipe, train_in_two_cpu_processes)

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8  # 128 training examples / batch 16, drop_last (TINY_OVERRIDES)


def write_recipe(path: Path, recipe) -> Path:
    save_recipe(recipe, path)
    return path


def ckpt_names(run_dir: Path) -> list[str]:
    ckpts = run_dir / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.is_dir()) if ckpts.is_dir() else []


pytestmark = [pytest.mark.slow,  # end-to-end training: the full tier
              pytest.mark.usefixtures("forget_accelerate_state")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two epochs without interruption, with dropout, label noise, tensorboard and mid-epoch
    checkpoints; shared by the resume, file-format, outputs and export tests (read only)."""
    root = tmp_path_factory.mktemp("straight")
    recipe = tiny_recipe(root, *RANDOM_OVERRIDES, "run.name=straight", "run.checkpoint_every=5",
                         "run.log_with=[tensorboard]")
    return recipe, engine.train(recipe)


# ---------------------------------------------------------------------------- 1. exact resume

def test_resume_mid_epoch_is_bit_exact(straight, tmp_path, capsys):
    _, run_a = straight
    same = [*RANDOM_OVERRIDES, "run.name=resumed", "run.checkpoint_every=5",
            "run.log_with=[tensorboard]"]
    run_b = tmp_path / "resumed"
    stop_then_resume(lambda *more: tiny_recipe(tmp_path, *same, *more), run_b,
                     STEPS_PER_EPOCH + 3, capsys)  # stopped in the middle of epoch 2
    assert checkpoint.latest(run_b / "checkpoints").name == f"ckpt-{2 * STEPS_PER_EPOCH:08d}"

    a, b = latest_weights(run_a), latest_weights(run_b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
    # and the same optimizer state (momentum buffers) and scheduler position
    states_a = checkpoint.load(checkpoint.latest(run_a / "checkpoints"))[1]
    states_b = checkpoint.load(checkpoint.latest(run_b / "checkpoints"))[1]
    assert states_a["scheduler"] == states_b["scheduler"]
    momenta_a = states_a["optimizer"]["state"]
    momenta_b = states_b["optimizer"]["state"]
    assert momenta_a.keys() == momenta_b.keys() and momenta_a
    assert all(torch.equal(momenta_a[i]["momentum_buffer"], momenta_b[i]["momentum_buffer"])
               for i in momenta_a)
    # the same records (accuracies, losses, lr), also in metrics.jsonl
    history_a, history_b = engine.history_of(run_a), engine.history_of(run_b)
    assert len(history_a) == 2 and history_a == history_b

    def metrics(run_dir: Path) -> list[dict]:
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert metrics(run_a) == metrics(run_b) == history_a


def test_a_resumed_run_replays_autos_choice(tmp_path, monkeypatch, capsys):
    """auto times the execution modes when a run starts; the checkpoint records its choice, and
    the resumed run runs it again without timing, bit-exact to a straight run."""
    def machine_where(fastest: str) -> None:
        monkeypatch.setattr(execution, "_time_plans", lambda plans, *args, **kwargs: {
            mode: 0.5e-3 if mode == fastest else 1e-3 for mode in plans})

    machine_where("packed")
    run_a = engine.train(tiny_recipe(tmp_path, "run.name=a"))
    stop = STEPS_PER_EPOCH + 3
    make = lambda *more: tiny_recipe(tmp_path, "run.name=b", *more)  # noqa: E731
    engine.train(make(f"train.max_steps={stop}"))
    _, _, progress = checkpoint.load(checkpoint.latest(tmp_path / "b" / "checkpoints"))
    assert progress.execution == {"layer1..output": {"mode": "packed",
                                                     "ms": {"loop": 1.0, "fused": 1.0,
                                                            "packed": 0.5}}}
    machine_where("fused")  # a new timing would choose fused now
    capsys.readouterr()
    engine.train(make("run.resume=auto"))
    out = capsys.readouterr().out
    assert "layer1..output: 2 copies in groups of 2, running packed (auto replays the " \
           "checkpointed choice, timed: loop 1.0 ms, fused 1.0 ms, packed 0.5 ms" in out
    a, b = latest_weights(run_a), latest_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert any("running packed (auto replays" in line for line in summary["execution"])


# ---------------------------------------------------------------------------- 2. atomic checkpoints

def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "crash"
    common = ["run.name=crash", "run.checkpoint_every=1", "run.resume=auto"]
    engine.train(tiny_recipe(tmp_path, *common, "train.max_steps=2"))
    ckpts = run_dir / "checkpoints"
    good = ckpts / "ckpt-00000002"
    assert checkpoint.latest(ckpts) == good
    good_weights = load_file(str(good / "model.safetensors"))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("collabsurgery.rundir.checkpoint.training_state.save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        engine.train(tiny_recipe(tmp_path, *common, "train.max_steps=3"))
    monkeypatch.undo()

    # the crash left a partial ckpt-3.tmp (weights written, no optimizer, no state.json)
    partial = ckpts / "ckpt-00000003.tmp"
    assert (partial / "model.safetensors").is_file() and not (partial / "state.json").exists()
    assert not (ckpts / "ckpt-00000003").exists()
    assert checkpoint.latest(ckpts) == good
    model_state, states, progress = checkpoint.load(good)
    assert progress.global_step == 2 and set(states) == {"optimizer", "scheduler"}
    assert all(torch.equal(model_state[k], v) for k, v in good_weights.items())

    # a complete-looking leftover .tmp with a higher step is never read, with or without pointer
    fake = ckpts / "ckpt-00000099.tmp"
    fake.mkdir()
    state = json.loads((good / "state.json").read_text())
    (fake / "state.json").write_text(json.dumps({**state, "global_step": 99, "epoch": 1}))
    (fake / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    assert checkpoint.latest(ckpts) == good
    (ckpts / "latest").unlink()
    assert checkpoint.latest(ckpts) == good
    assert engine.history_of(run_dir) == state["history"]

    # naming a .tmp directory explicitly is refused
    recipe_file = write_recipe(tmp_path / "crash.yaml", tiny_recipe(tmp_path, *common))
    capsys.readouterr()
    assert cli.main(["train", "--recipe", str(recipe_file), f"run.resume={fake}"]) == 2
    assert "run.resume" in one_line_error(capsys.readouterr().err)

    # resume=auto continues from the real checkpoint and the next save prunes every .tmp
    engine.train(tiny_recipe(tmp_path, *common, "train.max_steps=4"))
    assert f"resumed from {good} " in capsys.readouterr().out
    assert ckpt_names(run_dir) == ["ckpt-00000003", "ckpt-00000004"]  # keep=2, no .tmp left
    assert (ckpts / "latest").read_text().strip() == "ckpt-00000004"
    assert checkpoint.load(ckpts / "ckpt-00000004")[2].global_step == 4


# ---------------------------------------------------------------------------- 3. two processes

@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    recipe_file = write_recipe(tmp_path / "ddp.yaml",
                               tiny_recipe(tmp_path, "run.name=ddp", "train.epochs=1"))
    train_in_two_cpu_processes(recipe_file)
    run_dir = tmp_path / "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # the training data was sharded: each rank saw half the batches of an epoch
    _, _, progress = checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))
    assert progress.epoch == 1 and progress.global_step == STEPS_PER_EPOCH // 2
    # auto timed on both ranks; the main rank's choice, recorded, is what ran and resumes
    assert list(progress.execution) == ["layer1..output"]
    chosen = progress.execution["layer1..output"]["mode"]
    assert f"  layer1..output: 2 copies in groups of 2, running {chosen} (auto timed: " in \
        "\n".join(summary["execution"])
    # evaluation gathered both ranks' examples exactly once
    splits = load_splits(**data_arguments(load_recipe(recipe_file).data), seed=0)
    assert summary["final"]["test"]["examples"] == len(splits.test)
    assert summary["final"]["holdout"]["examples"] == len(splits.holdout)


# ---------------------------------------------------------------------------- 4. non-finite loss

def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    recipe_file = write_recipe(tmp_path / "nan.yaml", tiny_recipe(
        tmp_path, "run.name=nan", "run.checkpoint_every=1", "train.epochs=1"))
    calls = {"n": 0}
    original = ConsensusLoss.head_losses

    def poisoned(self, logits, labels, context):
        calls["n"] += 1
        per_head, parts = original(self, logits, labels, context)
        return (per_head * float("nan") if calls["n"] >= 3 else per_head), parts

    monkeypatch.setattr(ConsensusLoss, "head_losses", poisoned)
    assert cli.main(["train", "--recipe", str(recipe_file)]) == 1
    err = capsys.readouterr().err
    line = one_line(err)
    assert line.startswith("collabsurgery: training stopped: ")
    assert "non-finite loss" in line and "batch 3" in line
    assert calls["n"] == 3  # stopped at once
    ckpts = tmp_path / "nan" / "checkpoints"
    assert ckpt_names(tmp_path / "nan") == ["ckpt-00000001", "ckpt-00000002"]  # nothing after
    model_state, _, progress = checkpoint.load(checkpoint.latest(ckpts))
    assert progress.global_step == 2 and progress.batch == 2
    assert all(torch.isfinite(v).all() for v in model_state.values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- 5. file formats

def test_every_file_a_run_writes_loads_safely(straight):
    from PIL import Image
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    _, run_dir = straight
    kinds: dict[str, int] = {}
    scalar_tags: set[str] = set()
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith(".safetensors"):
            kind = "safetensors"
            with safe_open(str(path), framework="pt") as f:  # weights, or a statefile state
                assert list(f.keys()) or f.metadata()["format"] == training_state.FORMAT
        elif name.endswith(".jsonl"):
            kind = "jsonl"
            assert [json.loads(line) for line in path.read_text().splitlines()]
        elif name.endswith(".json"):
            kind = "json"
            json.loads(path.read_text())
        elif name.endswith((".yaml", ".yml")):
            kind = "yaml"
            yaml.safe_load(path.read_text())
        elif name.endswith(".png"):
            kind = "png"
            with Image.open(path) as image:
                image.verify()
        elif name.startswith("events.out.tfevents."):
            kind = "tfevents"
            for event in EventFileLoader(str(path)).Load():
                scalar_tags.update(v.tag for v in event.summary.value)
        elif name == "run.lock" and path.parent == run_dir:
            kind = "lock"  # the last trainer's PID, host and start (collabsurgery.rundir.lock)
            assert {"pid", "host", "since"} <= set(json.loads(path.read_text()))
        elif name == "latest" and path.parent.name == "checkpoints":
            kind = "pointer"
            assert (path.parent / path.read_text().strip() / "state.json").is_file()
        else:
            pytest.fail(f"run wrote a file of unknown format: {path.relative_to(run_dir)}")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert {"safetensors", "json", "jsonl", "yaml", "png", "tfevents", "pointer"} <= set(kinds)
    assert {"holdout/ensemble_acc", "test/head0_acc", "train_loss"} <= scalar_tags


# ---------------------------------------------------------------------------- 6. user errors

@pytest.mark.parametrize("recipe_text, overrides, named", [
    ("train:\n  epoch: 3\n", [], "train.epoch"),                  # unknown key in the file
    ("", ["train.epcohs=2"], "train.epcohs"),                     # mistyped key in an override
    ("", ["train.epochs=two"], "train.epochs"),                   # wrong type
    ("", ["graph.heads=0"], "graph.heads"),                       # impossible value
    ("", ["train.batch_size=100000"], "train.batch_size"),        # more than the data
    (None, [], "no-such-recipe.yaml"),                            # missing recipe file
    ("", ["data.source=/no/such/dir"], "/no/such/dir"),           # missing data directory
    ("", ["data.image_column=img"], "data.image_column"),         # missing column
])
def test_bad_recipe_or_data_is_one_line_exit_2(tmp_path, capsys, recipe_text, overrides, named):
    recipe_file = tmp_path / "no-such-recipe.yaml"
    if recipe_text is not None:
        base = yaml.safe_load(yaml.safe_dump({
            "data": {"image_size": 16, "max_train_examples": 128},
            "train": {"batch_size": 16, "epochs": 1},
            "graph": {"heads": 2, "split": ["layer1"]},
            "run": {"dir": str(tmp_path / "runs"), "progress": False}}))
        for key, value in (yaml.safe_load(recipe_text) or {}).items():
            base.setdefault(key, {}).update(value)
        recipe_file.write_text(yaml.safe_dump(base))
    code = cli.main(["train", "--recipe", str(recipe_file), *overrides])
    captured = capsys.readouterr()
    assert code == 2
    line = one_line_error(captured.err)
    assert line.startswith("collabsurgery: error: ") and named in line
    assert not (tmp_path / "runs").exists()  # found before anything is written


# ---------------------------------------------------------------------------- 7. export from a run

def test_export_best_head_of_a_run(straight, tmp_path, capsys):
    recipe, run_dir = straight
    out = tmp_path / "best.safetensors"
    assert cli.main(["export", str(run_dir), "--head", "best", "-o", str(out)]) == 0
    assert "exported head" in capsys.readouterr().out
    history = engine.history_of(run_dir)
    best = history[-1]["holdout"]["best_head"]
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert int(metadata["head"]) == best
    saved = yaml.safe_load(metadata["recipe"])
    assert saved["name"] == recipe.name and saved["graph"]["heads"] == 2
    metrics = json.loads(metadata["metrics"])
    assert metrics["epoch"] == 2
    assert metrics["holdout_acc"] == history[-1]["holdout"]["head_acc"][best]
    assert metrics["test_acc"] == history[-1]["test"]["head_acc"][best]

    model = timm.create_model(recipe.model.name, num_classes=10)
    model.load_state_dict(load_file(str(out)), strict=True)
    net, run_history = load_run(run_dir)
    assert run_history == history
    test = load_splits(**data_arguments(recipe.data), seed=recipe.seed).test
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        exported, graph = model.eval()(images), net.eval()(images)[best]
    assert_same_logits(exported, graph)


def test_a_first_wave_run_without_objective_keys_still_exports_and_resumes(straight, tmp_path):
    """Runs written before objectives could own modules hold the graph's keys unprefixed and a
    tree-only graph.json; export and resume read them."""
    recipe, run_dir = straight
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "graph.json").write_text(json.dumps({
        "model": "cifar_resnet20", "model_kwargs": {"num_classes": 10, "drop_rate": 0.2},
        "split": ["layer1"],
        "heads": 2, "pattern": "tree", "branches": None, "rescale": "backprop",
        "input_size": [3, 16, 16]}))
    latest = checkpoint.latest(old / "checkpoints")
    state = load_file(str(latest / "model.safetensors"))
    save_file({k.removeprefix("graph."): v for k, v in state.items()},
              str(latest / "model.safetensors"))
    record = json.loads((latest / "state.json").read_text())  # they recorded no file hashes
    del record["files"], record["checksum"]
    (latest / "state.json").write_text(json.dumps(record))
    out = tmp_path / "head0.safetensors"
    assert cli.main(["export", str(old), "--head", "0", "-o", str(out)]) == 0
    net, _ = load_run(run_dir)
    assert all(torch.equal(v, net.head_state_dict(0)[k]) for k, v in load_file(str(out)).items())
    session = engine.setup(tiny_recipe(tmp_path, *RANDOM_OVERRIDES, "run.name=old",
                                       "run.resume=auto"))
    resumed = session.collaboration.graph.state_dict()
    assert all(torch.equal(resumed[k], net.state_dict()[k]) for k in resumed)


# ---------------------------------------------------------------------------- 8. run outputs

def test_run_outputs_and_resume_no(straight, capsys):
    recipe, run_dir = straight
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["step"] for r in records] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for r in records:
        for split in ("holdout", "test"):
            assert len(r[split]["head_acc"]) == 2 and len(r[split]["head_loss"]) == 2
            assert all(0 <= a <= 1 for a in r[split]["head_acc"])
            assert 0 <= r[split]["ensemble_acc"] <= 1
            assert r[split]["best_head"] in (0, 1)
        assert r["train_loss"] > 0
    assert records == engine.history_of(run_dir)
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["final"] == records[-1]
    # the resolved recipe reloads to the same recipe
    assert load_recipe(run_dir / "recipe.yaml") == recipe
    # keep=2: only the last two checkpoints remain; the pointer names the newest
    assert ckpt_names(run_dir) == ["ckpt-00000015", "ckpt-00000016"]
    # a second run into a directory with checkpoints must ask for resume=auto
    before = sorted(p.name for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert cli.main(["train", "--recipe", str(run_dir / "recipe.yaml"), "run.resume=no"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "run.resume=auto" in line
    assert sorted(p.name for p in run_dir.rglob("*")) == before


# ---------------------------------------------------------------------------- 9. bf16 and rescale

def test_bf16_on_cpu_with_loss_rescaling(tmp_path, monkeypatch):
    from accelerate import Accelerator

    seen: dict[str, list] = {"dtype": [], "objective": [], "backward": []}
    original_forward = ConsensusLoss.forward
    original_backward = Accelerator.backward

    def forward(self, out, labels, step=None, graph=None):
        out = original_forward(self, out, labels, step, graph)
        seen["objective"].append(out.loss.detach().clone())
        return out

    def backward(self, loss, **kwargs):
        seen["backward"].append(loss.detach().clone())
        return original_backward(self, loss, **kwargs)

    def conv_output(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():  # training steps
            seen["dtype"].append(output.dtype)

    monkeypatch.setattr(ConsensusLoss, "forward", forward)
    monkeypatch.setattr(Accelerator, "backward", backward)
    hook = torch.nn.modules.module.register_module_forward_hook(conv_output)
    try:
        run_dir = engine.train(tiny_recipe(tmp_path, "run.name=bf16", "train.epochs=1",
                                           "data.max_train_examples=64", "data.image_size=8",
                                           "train.mixed_precision=bf16",
                                           "graph.rescale=loss"))
    finally:
        hook.remove()
    assert len(seen["objective"]) == len(seen["backward"]) == 4
    assert set(seen["dtype"]) == {torch.bfloat16}  # training convolutions ran under autocast
    for raw, scaled in zip(seen["objective"], seen["backward"]):
        assert torch.isfinite(raw) and torch.equal(scaled, raw * 0.5)  # 1/H with H=2
    (record,) = engine.history_of(run_dir)
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    assert all(torch.isfinite(torch.tensor(record[s]["head_loss"])).all()
               for s in ("holdout", "test"))
    weights = latest_weights(run_dir)
    assert all(v.dtype != torch.bfloat16 for v in weights.values())  # master weights stay fp32
