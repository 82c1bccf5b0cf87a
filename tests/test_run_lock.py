"""One trainer per run directory (issue 30, item 1): a second trainer on a run directory in use
is refused in one line naming the holder (PID and host), exit 2, writing nothing; the lock dies
with its process (kill -9 leaves none); readers (export) need no lock; a process may reopen a
run directory it holds itself (``engine.setup`` then ``engine.train``)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collabsurgery.config.recipe import save_recipe
from collabsurgery.errors import UserError
from collabsurgery.rundir import lock
from collabsurgery.train import engine

from helpers import lock_held_by_the_os, one_line_error, run_cli, tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")

#: a process that holds a run directory's lock until it is killed
HOLDER = ("import sys, time; from pathlib import Path; from collabsurgery.rundir import lock; "
          "held = lock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*")}


def test_the_lock_is_exclusive_reentrant_in_its_process_and_released(tmp_path):
    run_dir = tmp_path / "run"
    first = lock.acquire(run_dir)
    assert lock_held_by_the_os(run_dir)
    again = lock.acquire(run_dir)  # this process again (a session still alive): allowed
    first.release()
    assert lock_held_by_the_os(run_dir)
    again.release()
    again.release()  # idempotent
    assert not lock_held_by_the_os(run_dir) and not lock.is_held(run_dir)
    assert f'"pid": {os.getpid()}' in (run_dir / lock.LOCK_FILE).read_text()


@pytest.mark.slow
def test_a_second_trainer_is_refused_in_one_line_and_kill_9_leaves_no_lock(tmp_path, capsys):
    """Trainer A (a separate process) trains; trainer B on the same run directory is refused
    with one line naming A's PID and host, exit 2, and A's run is untouched; after A is killed
    with SIGKILL the directory is free and B resumes A's run."""
    recipe_file = save_recipe(tiny_recipe(tmp_path, "run.name=run", "run.checkpoint_every=1",
                                          "train.epochs=200", "run.resume=auto"),
                              tmp_path / "run.yaml")
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen([sys.executable, "-m", "collabsurgery.cli", "train", "--recipe",
                          str(recipe_file)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list((run_dir / "checkpoints").glob("ckpt-*")) and a.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert a.poll() is None, a.stderr.read()
        before = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "graph.json")}
        capsys.readouterr()
        code = run_cli(["train", "--recipe", recipe_file, "train.max_steps=2"])  # B
        line = one_line_error(capsys.readouterr().err)
        assert code == 2, line
        assert f"run directory {run_dir} is in use by another trainer (PID {a.pid} on host " \
               f"{socket.gethostname()}, since " in line
        assert {name: (run_dir / name).read_bytes() for name in before} == before
        assert lock_held_by_the_os(run_dir)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    assert not lock_held_by_the_os(run_dir)  # the kernel dropped it with its process
    # B now resumes A's run (one more step) instead of being refused
    step = int((run_dir / "checkpoints" / "latest").read_text().split("-")[1])
    assert run_cli(["train", "--recipe", recipe_file, f"train.max_steps={step + 1}"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not lock_held_by_the_os(run_dir)


def test_a_held_directory_refuses_before_any_work_and_writes_nothing(tmp_path):
    """Another process holds the lock: ``engine.train`` raises the one-line refusal at once
    (before data or graph are built) and changes nothing in the directory."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        started = time.monotonic()
        with pytest.raises(UserError, match=f"in use by another trainer \\(PID {holder.pid} "):
            engine.train(tiny_recipe(tmp_path, "run.name=run", "run.resume=auto"))
        assert time.monotonic() - started < 5
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_session_left_alive_does_not_block_its_own_process(tmp_path):
    """``engine.setup`` then ``engine.train`` on the same run directory in one process (a
    notebook, or a test that inspects a session first) both run."""
    recipe = tiny_recipe(tmp_path, "run.name=run", "train.max_steps=1")
    session = engine.setup(recipe)
    assert lock_held_by_the_os(tmp_path / "run")
    engine.train(recipe)
    assert lock_held_by_the_os(tmp_path / "run")  # still the session's
    session.run_lock.release()
    assert not lock_held_by_the_os(tmp_path / "run")
