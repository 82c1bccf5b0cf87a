"""A full disk is one line and exit 2, never a traceback, and leaves nothing half-written
(issue 30, item 3): during a checkpoint (naming the run directory, the space needed and the
checkpoint kept; the run resumes from it once there is space), an export and a model folder.

The disk fills up by injection: the safetensors writer fails as it does on a full device,
with ``OSError(ENOSPC)`` or with safetensors' own ``SafetensorError`` quoting "os error 28",
after writing part of the file.
"""
from __future__ import annotations

import errno
from pathlib import Path

import pytest
from safetensors import SafetensorError

from collabsurgery.common import tensorfile
from collabsurgery.common.diskfull import DiskFull, is_disk_full
from collabsurgery.config.recipe import save_recipe
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import one_line_error, run_cli, tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")

FAILURES = {
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "SafetensorError": lambda: SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'),
}


def fill_the_disk(monkeypatch, failure: str, when=lambda path: True) -> None:
    """Make every safetensors write for which ``when(path)`` holds fail as on a full disk,
    after leaving half a file behind."""
    real = tensorfile.save_file

    def save_file(tensors, path, metadata=None):
        if not when(Path(path)):
            return real(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"\0" * 1000)
        raise FAILURES[failure]()

    monkeypatch.setattr(tensorfile, "save_file", save_file)


def test_what_counts_as_a_full_disk():
    assert all(is_disk_full(make()) for make in FAILURES.values())
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(SafetensorError("header too large"))


@pytest.mark.parametrize("failure", FAILURES)
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_one(failure, tmp_path,
                                                                          monkeypatch, capsys):
    recipe_file = save_recipe(tiny_recipe(tmp_path, "run.name=run", "run.checkpoint_every=1",
                                          "run.keep=1", "train.max_steps=3"),
                              tmp_path / "run.yaml")
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    fill_the_disk(monkeypatch, failure, lambda path: path.parent.name == "ckpt-00000002.tmp")
    capsys.readouterr()
    assert run_cli(["train", "--recipe", recipe_file]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"no space left on the device for checkpoint ckpt-00000002 in {run_dir}: it needs " \
           "about " in line and " MB free and " in line and " is free; " in line, line
    assert "the last good checkpoint ckpt-00000001 is kept" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-00000001", "latest"]
    assert checkpoint.latest(ckpts) == ckpts / "ckpt-00000001"
    monkeypatch.undo()  # space again: the run resumes from the kept checkpoint
    assert run_cli(["train", "--recipe", recipe_file, "run.resume=auto"]) == 0
    assert f"resumed from {ckpts / 'ckpt-00000001'}" in capsys.readouterr().out
    assert checkpoint.latest(ckpts) == ckpts / "ckpt-00000003"


def test_disk_full_at_a_run_s_first_checkpoint_says_none_is_kept(tmp_path, monkeypatch):
    fill_the_disk(monkeypatch, "ENOSPC")
    with pytest.raises(DiskFull, match="no earlier checkpoint exists") as info:
        engine.train(tiny_recipe(tmp_path, "run.name=run", "train.max_steps=1"))
    assert "\n" not in str(info.value)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return engine.train(tiny_recipe(tmp_path_factory.mktemp("finished"), "run.name=run",
                                    "train.max_steps=1"))


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("format", ["safetensors", "timm-folder"])
def test_disk_full_during_an_export_is_one_line_and_leaves_nothing(format, failure, finished,
                                                                    tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "out" / ("head.safetensors" if format == "safetensors" else "folder")
    out.parent.mkdir()
    fill_the_disk(monkeypatch, failure, lambda path: out.parent in path.parents)
    capsys.readouterr()
    assert run_cli(["export", finished, "--head", "0", "-o", out, "--format", format]) == 2
    line = one_line_error(capsys.readouterr().err)
    what = "export head.safetensors" if format == "safetensors" else "model folder folder"
    assert f"no space left on the device for {what} in {out.parent}: it needs about " in line
    assert list(out.parent.iterdir()) == []
