"""A save interrupted at any moment leaves an intact checkpoint, and resume uses it or says in
one line why it cannot (issue 30, item 2).

The window: with ``run.checkpoint_every`` dividing the steps of an epoch, the mid-epoch and the
end-of-epoch saves share a step number; with ``run.keep=1`` the re-save once removed
``ckpt-N`` before renaming ``ckpt-N.tmp`` into place, and a kill between the two left only the
``.tmp`` and a ``latest`` naming nothing, from which ``run.resume=auto`` silently started over.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import RANDOM_OVERRIDES, assert_same_weights, latest_weights, tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")
STEPS_PER_EPOCH = 8  # the tiny recipe: 128 examples, batch 16
COMMON = [*RANDOM_OVERRIDES, f"run.checkpoint_every={STEPS_PER_EPOCH}", "run.keep=1"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the library catches it, and nothing after it runs."""


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{step:08d}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("straight")
    return engine.train(tiny_recipe(root, *COMMON, "run.name=straight"))


@pytest.mark.slow
def test_a_kill_inside_the_re_save_of_a_step_resumes_from_that_step(straight, tmp_path,
                                                                    monkeypatch, capfd):
    """Kill the end-of-epoch re-save of step 8 just before its ``.tmp`` takes the name
    ``ckpt-00000008``: resume adopts the complete ``.tmp`` (one line), continues from step 8
    and ends bit-identical to the uninterrupted run."""
    real_replace = os.replace
    renames = []

    def kill_on_second_rename_into_step_8(src, dst, *args, **kwargs):
        if Path(src).name == "ckpt-00000008.tmp":
            renames.append(dst)
            if len(renames) == 2:  # the end-of-epoch save of the step saved mid-epoch
                raise Killed
        return real_replace(src, dst, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(checkpoint.os, "replace", kill_on_second_rename_into_step_8)
    with pytest.raises(Killed):
        engine.train(tiny_recipe(tmp_path, *COMMON, "run.name=run"))
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert (ckpt(run_dir, 8).parent / "ckpt-00000008.tmp").is_dir()
    # an intact copy of step 8 exists under some name at this moment
    assert any(p.name.startswith("ckpt-00000008") and checkpoint.verify(p)
               for p in ckpt(run_dir, 8).parent.iterdir())
    capfd.readouterr()
    engine.train(tiny_recipe(tmp_path, *COMMON, "run.name=run", "run.resume=auto"))
    out, err = capfd.readouterr()
    adopted = [line for line in err.splitlines() if "adopted" in line]
    assert len(adopted) == 1 and "ckpt-00000008.tmp is a complete, verified checkpoint" \
        in adopted[0], err
    assert f"resumed from {ckpt(run_dir, 8)} (epoch 2, batch 0)" in out
    assert_same_weights(latest_weights(run_dir), latest_weights(straight))
    assert sorted(p.name for p in ckpt(run_dir, 8).parent.iterdir()) == \
        ["ckpt-00000016", "latest"]


def test_a_re_save_of_a_step_never_removes_it_before_its_replacement_is_in_place(tmp_path,
                                                                                monkeypatch):
    """After every removal during a same-step re-save, ``ckpt-N`` is there and verifies (the
    old one until the new one has taken its name): nothing is ever deleted first."""
    import torch

    state = {"w": torch.arange(6.0)}
    ckpts = tmp_path / "checkpoints"
    checkpoint.save(ckpts, 8, state, {}, checkpoint.Progress(global_step=8, batch=8), keep=1)
    missing_after = []
    real_rmtree = shutil.rmtree

    def watched_rmtree(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        try:
            checkpoint.verify(ckpt(tmp_path, 8))
        except checkpoint.DamagedCheckpoint as err:
            missing_after.append(f"{Path(path).name}: {err.problem}")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", watched_rmtree)
    checkpoint.save(ckpts, 8, state, {}, checkpoint.Progress(epoch=1, global_step=8), keep=1)
    assert not missing_after
    assert checkpoint.load(ckpt(tmp_path, 8))[2].epoch == 1


def make_run(tmp_path: Path, steps: int, keep: int = 2) -> Path:
    return engine.train(tiny_recipe(tmp_path, "run.name=run", "run.checkpoint_every=1",
                                    f"run.keep={keep}", f"train.max_steps={steps}"))


def resume(tmp_path: Path, capfd) -> tuple[str, str]:
    capfd.readouterr()
    engine.train(tiny_recipe(tmp_path, "run.name=run", "run.checkpoint_every=1",
                             "train.max_steps=3", "run.resume=auto"))
    return capfd.readouterr()


def test_an_unusable_interrupted_save_is_said_not_started_over_silently(tmp_path, capfd):
    """The only checkpoint is a half-written ``ckpt-N.tmp`` (a kill during the first save):
    resume says in one line that it cannot use it and starts over."""
    run_dir = make_run(tmp_path, 1)
    ckpt(run_dir, 1).rename(ckpt(run_dir, 1).with_name("ckpt-00000001.tmp"))
    (ckpt(run_dir, 1).with_name("ckpt-00000001.tmp") / "state.json").unlink()
    out, err = resume(tmp_path, capfd)
    said = [line for line in err.splitlines() if "ckpt-00000001.tmp" in line]
    assert len(said) == 1 and "interrupted before it was complete (state.json is missing)" \
        in said[0] and "starts over from step 0" in said[0], err
    assert "resumed from" not in out


def test_a_complete_save_killed_before_its_rename_is_adopted(tmp_path, capfd):
    run_dir = make_run(tmp_path, 2)
    ckpt(run_dir, 2).rename(ckpt(run_dir, 2).with_name("ckpt-00000002.tmp"))
    out, err = resume(tmp_path, capfd)
    assert "ckpt-00000002.tmp is a complete, verified checkpoint" in err
    assert f"resumed from {ckpt(run_dir, 2)} " in out


def test_latest_naming_a_missing_checkpoint_is_said(tmp_path, capfd):
    run_dir = make_run(tmp_path, 2)
    shutil.rmtree(ckpt(run_dir, 2))
    out, err = resume(tmp_path, capfd)
    said = [line for line in err.splitlines() if "which is missing" in line]
    assert len(said) == 1 and "names ckpt-00000002" in said[0] and \
        "resuming from ckpt-00000001" in said[0], err
    assert f"resumed from {ckpt(run_dir, 1)} " in out
