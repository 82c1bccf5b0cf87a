"""Atomic training checkpoints that hold no pickled code.

A checkpoint is a directory ``checkpoints/ckpt-<global step>/`` with

- ``model.safetensors``  the training graph's weights;
- ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` under fp16)  plain state dicts, loadable
  with ``torch.load(weights_only=True)``;
- ``state.json``  progress (epoch, batches done in it, optimizer steps) and metrics history.

No RNG state is stored: every random choice a run makes is drawn from generators seeded by
(seed, epoch, step), so progress alone replays it. (Accelerate's ``save_state`` would also pickle
the sampler object and numpy's RNG state, which ``weights_only`` loading refuses.)

Writing goes to ``ckpt-N.tmp/``, then a rename, then the ``latest`` pointer is replaced, then
older checkpoints are pruned. A crash at any point leaves the previous checkpoint intact, and a
``.tmp`` directory is never read.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .export import save_safetensors_atomic

LATEST = "latest"


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


def save(directory: Path, step: int, model_state: dict[str, torch.Tensor],
         states: dict[str, dict], progress: Progress, keep: int) -> Path:
    """Write checkpoint ``ckpt-<step>`` under ``directory`` atomically; call on the main process."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{step:08d}"
    tmp = directory / f"ckpt-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors_atomic(model_state, tmp / "model.safetensors", {"format": "pt"})
    for name, state in states.items():
        torch.save(state, tmp / f"{name}.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(progress), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = directory / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, directory / LATEST)
    _prune(directory, keep, final.name)
    return final


def _complete(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("ckpt-*")
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").is_file())


def _prune(directory: Path, keep: int, newest: str) -> None:
    for stale in directory.glob("ckpt-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in [p for p in _complete(directory) if p.name != newest][: -(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else the highest step."""
    pointer = directory / LATEST
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if candidate.is_dir() and (candidate / "state.json").is_file():
            return candidate
    complete = _complete(directory) if directory.is_dir() else []
    return complete[-1] if complete else None


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
    """Model weights, other state dicts by name, and progress of checkpoint ``path``."""
    model_state = load_file(str(path / "model.safetensors"))
    states = {p.stem: torch.load(p, map_location="cpu", weights_only=True)
              for p in sorted(path.glob("*.pt"))}
    progress = Progress(**json.loads((path / "state.json").read_text()))
    return model_state, states, progress
