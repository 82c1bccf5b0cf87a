"""A damaged, diverged or busy run is handled, not crashed on.

Damaged checkpoints (truncated weights, missing optimizer state, torn ``state.json``, a flipped
bit) are found by their recorded sizes and hashes: resume falls back to the newest intact one and
ends bit-identical to an uninterrupted run; export does the same, or refuses with one line and
exit 2 when nothing is intact. No checkpoint or export ever holds a NaN or an infinity. Export
works while a writer checkpoints and prunes every step. No file a run writes is a pickle, and
files get the user's umask.
"""
from __future__ import annotations

import json
import os
import pickletools
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.config.recipe import save_recipe
from collabsurgery.errors import UserError
from collabsurgery.graphs import rebuild, wrap
from collabsurgery.graphs.saving import config_from_json
from collabsurgery.objectives.consensus import ConsensusLoss
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import (RANDOM_OVERRIDES, assert_same_weights, latest_weights, one_line_error,
                     tiny_recipe)

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")
STEPS = 16  # two epochs of 8 steps (test_engine's tiny recipe)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{step:08d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    root = tmp_path_factory.mktemp("straight")
    return engine.train(tiny_recipe(root, *RANDOM_OVERRIDES, "run.name=straight"))


def truncate_model(path: Path) -> None:
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])


def remove_optimizer(path: Path) -> None:
    (path / "optimizer.safetensors").unlink()


def tear_state(path: Path) -> None:
    text = (path / "state.json").read_text()
    (path / "state.json").write_text(text[: len(text) // 2])


def flip_a_bit_in(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    file.write_bytes(bytes(data))


def flip_a_bit(path: Path) -> None:
    flip_a_bit_in(path / "model.safetensors")


DAMAGE = {"truncated model": (truncate_model, "model.safetensors is truncated"),
          "missing optimizer state": (remove_optimizer, "optimizer.safetensors is missing"),
          "torn state.json": (tear_state, "state.json is torn"),
          "flipped bit": (flip_a_bit, "model.safetensors does not match its SHA-256")}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.slow
def test_resume_falls_back_to_the_newest_intact_checkpoint(damage, straight, tmp_path, capfd):
    spoil, problem = DAMAGE[damage]
    run_dir = tmp_path / "run"
    common = [*RANDOM_OVERRIDES, "run.name=run", "run.checkpoint_every=1"]
    engine.train(tiny_recipe(tmp_path, *common, "train.max_steps=5"))
    spoil(ckpt(run_dir, 5))
    capfd.readouterr()
    engine.train(tiny_recipe(tmp_path, *common, "run.resume=auto"))
    out, err = capfd.readouterr()
    assert f"resumed from {ckpt(run_dir, 4)} " in out
    warning = [line for line in err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and problem in warning[0] and "ckpt-00000005" in warning[0]
    assert_same_weights(latest_weights(run_dir), latest_weights(straight))
    assert json.loads((run_dir / "summary.json").read_text())["final"] == \
        json.loads((straight / "summary.json").read_text())["final"]


@pytest.mark.slow
def test_export_of_a_damaged_run_falls_back_or_refuses(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    engine.train(tiny_recipe(tmp_path, *RANDOM_OVERRIDES, "run.name=run", "run.checkpoint_every=1",
                             "train.max_steps=3"))
    older = load_file(str(ckpt(run_dir, 2) / "model.safetensors"))
    truncate_model(ckpt(run_dir, 3))
    out = tmp_path / "head.safetensors"
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--head", "1", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "ckpt-00000003 is damaged" in err and len(err.strip().splitlines()) == 1
    net = rebuild(config_from_json((run_dir / "graph.json").read_text()))
    net.load_state_dict(checkpoint.split_state(older)[0])
    assert_same_weights(load_file(str(out)), net.head_state_dict(1))

    tear_state(ckpt(run_dir, 2))  # now nothing is intact
    out.unlink()
    assert cli.main(["export", str(run_dir), "--head", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    line = one_line_error(err.splitlines()[-1] + "\n")
    assert "no intact checkpoint" in line and "ckpt-00000002 (state.json is torn" in line
    assert not out.exists()
    # resume refuses too, and writes nothing
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(UserError, match="no intact checkpoint"):
        engine.train(tiny_recipe(tmp_path, *RANDOM_OVERRIDES, "run.name=run", "run.resume=auto"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == names


def test_a_checkpoint_is_verified_before_latest_points_at_it(tmp_path, monkeypatch):
    net = wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
    state = net.state_dict()
    first = checkpoint.save(tmp_path, 1, state, {}, checkpoint.Progress(global_step=1), keep=2)
    record = json.loads((first / "state.json").read_text())
    assert set(record["files"]) == {"model.safetensors"}
    assert record["files"]["model.safetensors"]["bytes"] == \
        (first / "model.safetensors").stat().st_size

    real_write = checkpoint.atomic.write_text

    def damage_before_state(path, text):  # the weights change on disk under the writer
        if path.name == "state.json":
            truncate_model(path.parent)
        return real_write(path, text)

    monkeypatch.setattr(checkpoint.atomic, "write_text", damage_before_state)
    with pytest.raises(checkpoint.DamagedCheckpoint, match="truncated"):
        checkpoint.save(tmp_path, 2, state, {}, checkpoint.Progress(global_step=2), keep=2)
    assert (tmp_path / "latest").read_text() == first.name
    assert checkpoint.latest(tmp_path) == first


def test_a_flipped_bit_in_an_export_is_found_on_load(tmp_path):
    net = wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
    path = cs.export(net, 0, tmp_path / "b.safetensors")
    assert isinstance(cs.load_backbone(path), torch.nn.Module)
    flip_a_bit_in(path)
    with pytest.raises(UserError, match="does not match the checksum"):
        cs.load_backbone(path)


# ---------------------------------------------------------------------------- non-finite state

@pytest.mark.slow
def test_a_diverging_run_never_writes_a_non_finite_checkpoint(tmp_path, capsys):
    recipe_file = tmp_path / "lr.yaml"
    save_recipe(tiny_recipe(tmp_path, "run.name=lr", "run.checkpoint_every=1", "train.lr=1e10"),
                recipe_file)
    assert cli.main(["train", "--recipe", str(recipe_file)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collabsurgery: training stopped: ")
    assert "last good checkpoint is" in lines[0] or "no checkpoint was written" in lines[0]
    for directory in (tmp_path / "lr" / "checkpoints").glob("ckpt-*"):
        state = load_file(str(directory / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_without_periodic_checkpoints_the_message_claims_none(tmp_path, capsys, monkeypatch):
    recipe_file = tmp_path / "nan.yaml"
    save_recipe(tiny_recipe(tmp_path, "run.name=nan"), recipe_file)
    original = ConsensusLoss.head_losses

    def poisoned(self, logits, labels, context):
        per_head, parts = original(self, logits, labels, context)
        return per_head * float("nan"), parts

    monkeypatch.setattr(ConsensusLoss, "head_losses", poisoned)
    assert cli.main(["train", "--recipe", str(recipe_file)]) == 1
    line = capsys.readouterr().err.strip()
    assert "non-finite loss" in line and "no checkpoint was written yet" in line
    assert "is kept" not in line and not (tmp_path / "nan" / "checkpoints").exists()


def test_export_refuses_non_finite_weights(tmp_path, capsys):
    net = wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    bn.running_var.fill_(float("inf"))  # as a diverged run leaves it
    bad = next(h for h in range(2) if any(t.data_ptr() == bn.running_var.data_ptr()
                                          for t in net.head_state_dict(h).values()))
    with pytest.raises(UserError, match=f"head {bad} has NaN or infinite values in 1 tensors"):
        cs.export(net, bad, tmp_path / "h.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- concurrent readers

@pytest.mark.slow
def test_export_while_a_writer_checkpoints_and_prunes_every_step(tmp_path):
    net = wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "graph.json").write_text(net.config.to_json())
    state = {f"graph.{k}": v for k, v in net.state_dict().items()}
    ckpts = run_dir / "checkpoints"
    checkpoint.save(ckpts, 0, state, {}, checkpoint.Progress(), keep=1)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for step in range(1, 150):
                checkpoint.save(ckpts, step, state, {}, checkpoint.Progress(global_step=step),
                                keep=1)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    exports = 0
    while not done.is_set():
        cli.main(["export", str(run_dir), "--head", "0", "-o", str(tmp_path / "h.safetensors")])
        exports += 1
    thread.join()
    assert not errors and exports >= 5
    assert cli.main(["export", str(run_dir), "--head", "0",
                     "-o", str(tmp_path / "h.safetensors")]) == 0


# ---------------------------------------------------------------------------- files

def is_pickle(data: bytes) -> bool:
    """A torch.save archive (a zip holding data.pkl) or a raw pickle stream."""
    if data[:4] == b"PK\x03\x04":
        return True
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return False
    return bool(ops) and ops[-1][0].name == "STOP" and ops[-1][2] == len(data) - 1


@pytest.mark.slow
def test_no_file_a_run_or_an_export_writes_is_a_pickle(straight, tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "control.pt")
    assert is_pickle((tmp_path / "control.pt").read_bytes())
    out = tmp_path / "head.safetensors"
    assert cli.main(["export", str(straight), "--head", "0", "-o", str(out)]) == 0
    files = [p for p in straight.rglob("*") if p.is_file()] + [out]
    assert len(files) > 10
    for path in files:
        assert not zipfile.is_zipfile(path) and not is_pickle(path.read_bytes()), path
    assert not list(straight.rglob("*.pt"))


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        net = wrap("cifar_resnet20", split="layer1", heads=2, input_size=(3, 16, 16))
        path = cs.export(net, 0, tmp_path / "b.safetensors")
        saved = checkpoint.save(tmp_path / "ckpts", 1, net.state_dict(), {
            "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict()},
            checkpoint.Progress(), keep=1)
    finally:
        os.umask(old)
    for file in [path, *saved.iterdir(), tmp_path / "ckpts" / "latest"]:
        assert file.stat().st_mode & 0o777 == 0o640, file
