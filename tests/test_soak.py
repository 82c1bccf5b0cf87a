"""Under load (issue 30): many short runs trained at once in separate processes, random
``kill -9``s, then every run resumed; each ends bit-identical to its straight twin.

Ten ``collabsurgery train`` processes start together: eight on their own run directories and
two on one shared directory (the second starts once the first holds the directory, and must
be refused in one line, exit 2). Seeded choices pick which of the eight are killed, after
which optimizer step, and how long after it (so some kills land inside a checkpoint save: with
``run.checkpoint_every=1`` the end-of-epoch save re-saves the step saved mid-epoch, with
``run.keep=1``). Then every run directory is resumed with ``run.resume=auto`` (in the test's
process, which has paid its start-up already). At the end:
every run's final checkpoint equals the straight twin's tensor for tensor (model, optimizer,
scheduler) with the same history, no file is a pickle, no tensor is NaN or infinite, no
``.tmp`` is left and no lock is held. The counts (runs, kills, resumes, refusals) are printed.
"""
from __future__ import annotations

import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from collabsurgery.config.recipe import load_recipe
from collabsurgery.rundir import checkpoint
from collabsurgery.train import engine

from helpers import lock_held_by_the_os

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forget_accelerate_state", "one_thread")]
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo-dml.yaml"
#: 32 examples in batches of 8: 4 steps an epoch, 8 in all, a checkpoint after every step
OVERRIDES = ["train.epochs=2", "data.image_size=12", "data.max_train_examples=32",
             "train.batch_size=8", "run.checkpoint_every=1", "run.keep=1", "run.progress=false"]
STEPS = 8
RUNS = 8
SEED = 30  # of the kill schedule


def newest_step(run_dir: Path) -> int:
    """The highest step any checkpoint directory of ``run_dir`` names (finished or not)."""
    try:
        names = os.listdir(run_dir / "checkpoints")
    except FileNotFoundError:
        return 0
    return max([int(m.group(1)) for n in names if (m := re.match(r"ckpt-(\d+)", n))] or [0])


#: ``collabsurgery train`` that imports first and starts when a line arrives on its stdin
#: (its first argument: a file it creates when it is ready)
ON_CUE = ("import sys; from pathlib import Path; from collabsurgery.cli import main; "
          "import collabsurgery.train.engine; Path(sys.argv[1]).touch(); sys.stdin.readline(); "
          "sys.exit(main(sys.argv[2:]))")


def arguments(root: Path, name: str) -> list[str]:
    return [*OVERRIDES, f"run.dir={root}", f"run.name={name}", "run.resume=auto"]


class Trainer:
    """One ``collabsurgery train`` process on run directory ``root/name``; ``on_cue``: it
    starts training when :meth:`go` is called (its imports done before)."""

    def __init__(self, root: Path, name: str, on_cue: bool = False):
        self.run_dir = root / name
        self.log = root / f"{name}.{os.urandom(4).hex()}.err"
        self.ready = self.log.with_suffix(".ready")
        start = ["-c", ON_CUE, str(self.ready)] if on_cue else ["-m", "collabsurgery.cli"]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *start, "train", "--recipe", str(RECIPE), *arguments(root, name)],
                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                stdin=subprocess.PIPE if on_cue else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, text=True)

    def go(self) -> None:
        """Start it (call once :attr:`ready` exists: its imports are done)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()

    def stderr(self) -> str:
        return self.log.read_text()


class SameDirectoryPair:
    """Two trainers on one run directory: both import, then the first starts, and the second
    starts once the first holds the directory."""

    def __init__(self, root: Path, name: str):
        self.first = Trainer(root, name, on_cue=True)
        self.second = Trainer(root, name, on_cue=True)
        self.stage = 0

    def tick(self) -> None:
        if self.stage == 0 and self.first.ready.exists() and self.second.ready.exists():
            self.first.go()
            self.stage = 1
        elif self.stage == 1 and lock_held_by_the_os(self.first.run_dir):
            self.second.go()
            self.stage = 2


def supervise(trainers: list[Trainer], schedule: dict[str, tuple[int, float]],
              pair: SameDirectoryPair, timeout: float = 300) -> int:
    """Wait for every trainer (and the pair); kill -9 those in ``schedule`` (name -> (step,
    delay)) ``delay`` seconds after their run reached ``step``. Returns how many were killed."""
    kills, due = 0, {}
    deadline = time.monotonic() + timeout
    trainers = [*trainers, pair.first, pair.second]
    while any(t.proc.poll() is None for t in trainers):
        assert time.monotonic() < deadline, "the soak test's trainers did not finish"
        pair.tick()
        for t in trainers:
            name = t.run_dir.name
            if t.proc.poll() is not None or name not in schedule:
                continue
            step, delay = schedule[name]
            if name not in due and newest_step(t.run_dir) >= step:
                due[name] = time.monotonic() + delay
            if name in due and time.monotonic() >= due[name]:
                t.proc.kill()  # SIGKILL
                t.proc.wait()
                kills += 1
                del schedule[name]
        time.sleep(0.01)
    return kills


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], list]:
    """Every tensor of a run's latest checkpoint (by file) and its epoch history."""
    ckpts = run_dir / "checkpoints"
    latest = checkpoint.latest(ckpts)
    assert latest == ckpts / f"ckpt-{STEPS:08d}", (run_dir, latest)
    tensors = {f"{f.name}/{k}": v for f in sorted(latest.glob("*.safetensors"))
               for k, v in load_file(str(f)).items()}
    return tensors, checkpoint.load(latest)[2].history


def cpu_seconds() -> float:
    """CPU time of this process and its finished children."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def looks_pickled(data: bytes) -> bool:
    """A torch.save zip archive or a pickle stream of protocol 2 or later."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def test_runs_killed_at_random_and_resumed_end_as_their_straight_twin(tmp_path, capfd):
    started, cpu = time.monotonic(), cpu_seconds()
    rng = random.Random(SEED)
    names = [f"run{i}" for i in range(RUNS)]
    # which runs are killed, after which step, and how long after it (0-150 ms: some kills
    # land inside a save); a step past the last means the run finishes first
    schedule = {name: (rng.randint(1, STEPS), rng.uniform(0, 0.15)) for name in names
                if rng.random() < 0.85}
    trainers = [Trainer(tmp_path, name) for name in names]
    pair = SameDirectoryPair(tmp_path, "shared")
    kills = supervise(trainers, schedule, pair)
    first, second = pair.first, pair.second
    refusals = 0
    assert second.proc.returncode == 2, second.stderr()
    lines = second.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collabsurgery: error: run directory ") \
        and f"{first.run_dir} is in use by another trainer (PID {first.proc.pid} on host " \
        in lines[0], lines
    refusals += 1
    assert first.proc.returncode == 0, first.stderr()

    # every run directory resumed (here, in this process: no second start-up cost each)
    resumes = 0
    capfd.readouterr()
    for name in [*names, "shared"]:
        engine.train(load_recipe(RECIPE, arguments(tmp_path, name)))
        resumes += 1
    said = capfd.readouterr().err.splitlines()
    adopted = sum("adopted it as" in line for line in said)
    unusable = sum("interrupted before it was complete" in line for line in said)

    twin = engine.train(load_recipe(RECIPE, [*OVERRIDES, f"run.dir={tmp_path / 'twin'}",
                                             "run.name=straight"]))
    expected, history = final_state(twin)
    for name in [*names, "shared"]:
        run_dir = tmp_path / name
        tensors, got_history = final_state(run_dir)
        assert tensors.keys() == expected.keys(), name
        assert all(torch.equal(tensors[k], expected[k]) for k in expected), name
        assert got_history == history, name
        assert sorted(os.listdir(run_dir / "checkpoints")) == [f"ckpt-{STEPS:08d}", "latest"]
        assert not lock_held_by_the_os(run_dir), name
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".pt", ".pth", ".pkl", ".bin"), path
            assert not looks_pickled(path.read_bytes()), path
        if path.suffix == ".safetensors":
            assert all(torch.isfinite(v).all() for v in load_file(str(path)).values()
                       if v.is_floating_point()), path
    seconds, cpu = time.monotonic() - started, cpu_seconds() - cpu
    with capfd.disabled():
        print(f"\nsoak: {RUNS + 2} trainers on {RUNS + 1} run directories, {kills} kills "
              f"(kill -9), {resumes} resumes ({adopted} adopted an interrupted complete save, "
              f"{unusable} said a half-written one was unusable), {refusals} refusals; "
              f"{seconds:.0f} s wall, {cpu:.0f} CPU-s")
    assert kills >= RUNS // 2
