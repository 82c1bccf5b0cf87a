"""Atomic, verified training checkpoints that need no unpickling.

A checkpoint is a directory ``checkpoints/ckpt-<global step>/`` with

- ``model.safetensors``  the weights of the training graph and of what its objective owns;
- ``ema.safetensors``  (runs with ``train.ema_decay``) the exponential moving average of the
  training graph's weights, a plain state dict of the graph like ``model.safetensors``'s
  ``graph.`` part, loaded into ``states["ema"]``;
- ``optimizer.safetensors``, ``scheduler.safetensors`` (and ``scaler.safetensors`` under fp16)
  state dicts stored by :mod:`collabsurgery.rundir.training_state` (tensors + JSON, no pickle);
- ``state.json``  progress (epoch, batches done in it, optimizer steps), metrics history, the
  size and SHA-256 of every other file, and a checksum of itself.

No RNG state is stored: every random choice a run makes is drawn from generators seeded by
(seed, epoch, step), so progress alone replays it. (Accelerate's ``save_state`` would also pickle
the sampler object and numpy's RNG state.)

Writing goes to ``ckpt-N.tmp/``; its files are synced to disk and read back against the sizes
and hashes in ``state.json``; then a rename, then the ``latest`` pointer is replaced, then older
checkpoints are pruned. When step N is saved again (mid-epoch and end-of-epoch saves share a
step when ``run.checkpoint_every`` divides the epoch), the old ``ckpt-N`` is renamed to
``ckpt-N.old`` before the new one takes its name and removed only after: at every moment an
intact copy exists. A crash at any point leaves the previous checkpoint intact. Readers
(:func:`load_latest`) never read ``.tmp``/``.old`` directories; they take the newest checkpoint
that verifies, say which newer ones are damaged, and list again when a running writer prunes
the one they were reading. The run's own writer, resuming (:func:`load_for_resume`), also
takes a complete, verified save that a crash left as ``ckpt-N.tmp`` (or ``.old``) and
:func:`adopt`s it, and says in one line whatever exists that it cannot use. A full disk is
one line (:class:`~collabsurgery.common.diskfull.DiskFull`) and leaves no ``.tmp`` behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from collabsurgery.common import atomic
from collabsurgery.common.diskfull import refuse_when_full, tensor_bytes
from collabsurgery.common.integrity import file_sha256
from collabsurgery.common.tensorfile import load_state, save_safetensors_atomic
from collabsurgery.errors import UserError
from collabsurgery.rundir import training_state

LATEST = "latest"
STATE = "state.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"  # the graph's EMA weights; loaded as states["ema"]
TMP = ".tmp"  # a save being written (or one a crash interrupted)
OLD = ".old"  # a checkpoint moved aside while the same step is saved again
_NAME = re.compile(r"ckpt-(\d+)(\.tmp|\.old)?")


@dataclass
class Progress:
    """Where a run is: ``epoch`` in progress, ``batch`` batches of it done, optimizer steps."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # the epoch in progress's training loss so far (sum over its batches, mean over processes)
    # and batch count, so that a mid-epoch resume logs the same train_loss as a straight run
    loss_sum: float = 0.0
    loss_count: int = 0
    # what the graph's ``auto`` execution chose, by stage (TrainingGraph.execution_choices), so
    # that a resumed run replays it instead of timing again
    execution: dict[str, Any] = field(default_factory=dict)


class DamagedCheckpoint(UserError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} is damaged: {problem}")
        self.path = path
        self.problem = problem


def _checksum(record: dict[str, Any]) -> str:
    """How ``state.json`` checks itself: SHA-256 of its other content."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def save(directory: Path, step: int, model_state: dict[str, torch.Tensor],
         states: dict[str, dict], progress: Progress, keep: int,
         ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``ckpt-<step>`` under ``directory`` atomically; call on the main process.
    ``ema_state`` (the graph's EMA weights, if the run keeps them) becomes ``ema.safetensors``.
    A full disk raises :class:`~collabsurgery.common.diskfull.DiskFull` (one line: the space
    needed, the checkpoint kept) after removing the half-written ``ckpt-<step>.tmp``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:08d}"
    tmp = final.with_name(final.name + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    needed = tensor_bytes([model_state, ema_state, states]) + 64 * 1024  # + JSON and headers
    with refuse_when_full(f"checkpoint {final.name}", directory.parent, needed,
                          _kept(directory), remove=tmp):
        tmp.mkdir()
        save_safetensors_atomic(model_state, tmp / MODEL, {"format": "pt"})
        if ema_state is not None:
            save_safetensors_atomic(ema_state, tmp / EMA, {"format": "pt"})
        for name, state in states.items():
            training_state.save_state(state, tmp / f"{name}.safetensors")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.iterdir())}
        record = {**asdict(progress), "files": files}
        atomic.write_text(tmp / STATE, json.dumps({**record, "checksum": _checksum(record)},
                                                  indent=1))
    verify(tmp)  # what is on disk is what was meant, before anything points at it
    _put_in_place(tmp, final)
    with refuse_when_full(f"the pointer {LATEST}", directory.parent, 4096,
                          f"checkpoint {final.name} is complete and kept"):
        atomic.write_text(directory / LATEST, final.name)
    _prune(directory, keep, final.name)
    return final


def _kept(directory: Path) -> str:
    """What a failed save leaves to resume from, in words."""
    found = candidates(directory)
    return f"the last good checkpoint {found[0].name} is kept" if found else \
        "no earlier checkpoint exists (this was the run's first)"


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the verified ``tmp`` to ``final``; a ``final`` already there (the same step saved
    again) is moved aside first and removed only once its replacement has its name."""
    aside = final.with_name(final.name + OLD)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    atomic.fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _step_dirs(directory: Path) -> list[Path]:
    """Every finished checkpoint directory, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("ckpt-*")
                  if p.is_dir() and re.fullmatch(r"ckpt-\d+", p.name))


def candidates(directory: Path) -> list[Path]:
    """Checkpoints to try, newest first: the ``latest`` pointer's, then the others by step."""
    found = _step_dirs(directory)[::-1]
    try:
        named = directory / (directory / LATEST).read_text().strip()
    except OSError:
        return found
    return [named, *(p for p in found if p != named)] if named in found else found


def _prune(directory: Path, keep: int, newest: str) -> None:
    for stale in [*directory.glob(f"ckpt-*{TMP}"), *directory.glob(f"ckpt-*{OLD}")]:
        shutil.rmtree(stale, ignore_errors=True)
    for old in [p for p in _step_dirs(directory) if p.name != newest][: -(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """The checkpoint's ``state.json`` record, after checking it and every file it lists;
    :class:`DamagedCheckpoint` says what is wrong. (Checkpoints written before files were
    recorded are not checked.)"""
    try:
        record = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{STATE} is missing") from None
    except (ValueError, OSError) as err:
        raise DamagedCheckpoint(path, f"{STATE} is torn or unreadable ({err})") from None
    if not isinstance(record, dict):
        raise DamagedCheckpoint(path, f"{STATE} is not a JSON object")
    checksum = record.pop("checksum", None)
    files = record.get("files")
    if files is None:
        return record
    if checksum != _checksum(record):
        raise DamagedCheckpoint(path, f"{STATE} does not match its checksum")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(path, f"{name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise DamagedCheckpoint(path, f"{name} is truncated or extended ({size} bytes "
                                          f"written as {expected['bytes']})")
        if file_sha256(file) != expected["sha256"]:
            raise DamagedCheckpoint(path, f"{name} does not match its SHA-256 (a flipped bit "
                                          "or an edit)")
    return record


def split_state(state: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's weights as (graph state, objective state).

    Checkpoints hold graph + objective under ``graph.`` / ``objective.``; those written before
    objectives could own modules hold the graph's keys alone.
    """
    if not any(k.startswith("graph.") for k in state):
        return dict(state), {}
    parts: dict[str, dict[str, torch.Tensor]] = {"graph": {}, "objective": {}}
    for key, value in state.items():
        owner, _, name = key.partition(".")
        parts[owner][name] = value
    return parts["graph"], parts["objective"]


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], Progress]:
    """Model weights, other state dicts by name (``"ema"``: the graph's EMA weights, where the
    run keeps them), and progress of checkpoint ``path``, after :func:`verify`;
    :class:`DamagedCheckpoint` if it does not verify."""
    record = verify(path)
    record.pop("files", None)
    try:
        model_state = load_state(path / MODEL)
        states = {p.name.removesuffix(".safetensors"): training_state.load_state(p)
                  for p in sorted(path.glob("*.safetensors")) if p.name not in (MODEL, EMA)}
        if (path / EMA).is_file():
            states["ema"] = load_state(path / EMA)
    except DamagedCheckpoint:
        raise
    except UserError as err:
        raise DamagedCheckpoint(path, str(err)) from None
    # checkpoints written before the pickle-free state files
    states.update({p.stem: torch.load(p, map_location="cpu", weights_only=True)
                   for p in sorted(path.glob("*.pt"))})
    return model_state, states, Progress(**record)


Loaded = tuple[dict[str, torch.Tensor], dict[str, dict], Progress]


def load_latest(directory: Path, warn: Callable[[str], None] | None = None
                ) -> tuple[Path, Loaded] | None:
    """The newest checkpoint under ``directory`` that verifies, loaded; None if there is none.

    A damaged newer checkpoint is reported through ``warn`` (one line each) and skipped; when
    every checkpoint is damaged, a UserError lists them. When a concurrent writer prunes the
    checkpoint being read, the directory is listed again.
    """
    reported: set[Path] = set()
    for _ in range(20):
        found = candidates(directory)
        if not found:
            return None
        damaged: list[str] = []
        for path in found:
            try:
                return path, load(path)
            except (DamagedCheckpoint, FileNotFoundError) as err:
                if candidates(directory)[:1] != found[:1]:
                    break  # a writer moved on (and may have pruned this one): list again
                problem = err.problem if isinstance(err, DamagedCheckpoint) else str(err)
                damaged.append(f"{path.name} ({problem})")
                if warn is not None and path not in reported:
                    warn(f"checkpoint {path} is damaged ({problem}); trying an older one")
                    reported.add(path)
        else:
            raise UserError(f"no intact checkpoint in {directory}: " + "; ".join(damaged)
                            + "; valid: a run with at least one intact checkpoint (start it "
                            "again with run.resume=no and another run.name)")
    raise UserError(f"{directory} changed while it was read 20 times; try again")


def _step(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def _interrupted(directory: Path) -> list[Path]:
    """Saves a crash left behind (``ckpt-N.tmp``, ``ckpt-N.old``) without a ``ckpt-N`` beside
    them, newest first (at one step the ``.tmp``, the newer of the two, first)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("ckpt-*") if p.is_dir() and _NAME.fullmatch(p.name)
             and p.name.endswith((TMP, OLD)) and not (directory / p.name[:-4]).exists()]
    return sorted(found, key=lambda p: (_step(p), p.name.endswith(TMP)), reverse=True)


def listing(directory: Path) -> tuple[str, ...]:
    """What a reader of ``directory`` saw: its entries' names and the ``latest`` pointer (to
    tell whether another process wrote checkpoints since)."""
    if not directory.is_dir():
        return ()
    try:
        pointer = (directory / LATEST).read_text()
    except OSError:
        pointer = ""
    return (*sorted(p.name for p in directory.iterdir()), f"{LATEST} -> {pointer}")


def load_for_resume(directory: Path, warn: Callable[[str], None]
                    ) -> tuple[Path, Loaded] | None:
    """For a trainer about to resume a run: as :func:`load_latest`, and a complete save that a
    crash left as ``ckpt-N.tmp`` or ``ckpt-N.old`` (no ``ckpt-N`` beside it) is taken too when
    it is the newest; its path is returned as it is, for :func:`settle` to adopt once the run's
    lock is held. Whatever exists but cannot be used is said through ``warn``, one line each,
    so a run never starts over silently; None when nothing is usable."""
    finished = candidates(directory)
    try:
        pointer = (directory / LATEST).read_text().strip()
    except OSError:
        pointer = ""
    newest = max([_step(p) for p in finished if p.name == pointer] or
                 [_step(p) for p in finished[:1]] or [-1])
    leftovers = [p for p in _interrupted(directory) if _step(p) >= newest]
    for path in leftovers:
        try:
            return path, load(path)
        except (DamagedCheckpoint, FileNotFoundError) as err:
            problem = err.problem if isinstance(err, DamagedCheckpoint) else str(err)
            then = f"trying {finished[0].name}" if finished else \
                "no other checkpoint exists, so this run starts over from step 0"
            warn(f"{path} is a save that was interrupted before it was complete ({problem}); "
                 f"{then}")
    if pointer and _NAME.fullmatch(pointer) and not (directory / pointer).exists() \
            and not leftovers:
        then = f"resuming from {finished[0].name}" if finished else \
            "no checkpoint exists, so this run starts over from step 0"
        warn(f"{directory / LATEST} names {pointer}, which is missing; {then}")
    return load_latest(directory, warn=warn)


def adopt(path: Path, warn: Callable[[str], None]) -> Path:
    """Put an interrupted but complete save (``ckpt-N.tmp`` / ``ckpt-N.old``, see
    :func:`load_for_resume`) in place as ``ckpt-N`` and point ``latest`` at it; says so in one
    line. Call with the run's lock held. A finished checkpoint is returned as it is."""
    if not path.name.endswith((TMP, OLD)):
        return path
    final = path.with_name(path.name[:-4])
    os.replace(path, final)
    atomic.fsync_path(final.parent)
    atomic.write_text(final.parent / LATEST, final.name)
    warn(f"{path.name} is a complete, verified checkpoint whose save was interrupted before "
         f"it was put in place; adopted it as {final}")
    return final


def settle(directory: Path, resumed: Path | None, warn: Callable[[str], None]) -> Path | None:
    """Before a run writes on (its lock held): :func:`adopt` the save it resumes from if that
    is an interrupted one, and remove what other interrupted saves left (said by
    :func:`load_for_resume`, or superseded). Returns where the run resumes from."""
    if resumed is not None:
        resumed = adopt(resumed, warn)
    for stale in [*directory.glob(f"ckpt-*{TMP}"), *directory.glob(f"ckpt-*{OLD}")]:
        shutil.rmtree(stale, ignore_errors=True)
    return resumed


def latest(directory: Path) -> Path | None:
    """The newest checkpoint under ``directory`` that verifies (see :func:`load_latest`)."""
    found = load_latest(directory)
    return found[0] if found else None
