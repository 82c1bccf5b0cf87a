"""Checks before a run writes anything: its directory, trackers, precision, and whether an
existing run can be resumed with this recipe's training graph. Each failure is one UserError."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from accelerate.state import PartialState

from collabsurgery.config.recipe import Recipe
from collabsurgery.errors import UserError, first_line, warn
from collabsurgery.graphs import TrainingGraph
from collabsurgery.graphs.saving import config_from_json


def check_writable(run_dir: Path) -> None:
    """UserError when ``run_dir`` cannot be created or written (before anything is written)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise UserError(f"run directory {run_dir} cannot be created: {problem}; valid: "
                        "run.dir in a writable directory")


def check_trackers(names: list[str], run_dir: Path) -> None:
    """UserError for a ``run.log_with`` tracker Accelerate does not know or cannot import
    (Accelerate itself would raise a traceback, or silently log nothing)."""
    from accelerate.tracking import filter_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    for name in names:
        if name not in known:
            raise UserError(f"recipe key 'run.log_with' names an unknown tracker '{name}'; "
                            f"valid: {', '.join(known)}")
        if name != "all" and not filter_trackers([name], logging_dir=str(run_dir)):
            raise UserError(f"recipe key 'run.log_with': tracker '{name}' is not installed; "
                            f"pip install {name}, or leave it out")


def runnable_precision(recipe: Recipe) -> Recipe:
    """fp16 autocast needs a GPU: on a CPU say so and record the fp32 that runs instead."""
    if recipe.train.mixed_precision != "fp16" or PartialState().device.type != "cpu":
        return recipe
    warn("train.mixed_precision=fp16 needs a GPU; this run trains in fp32 on the CPU and "
          "records train.mixed_precision=no (bf16 autocast does run on a CPU)")
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train,
                                                                 mixed_precision="no"))


#: recipe keys a resume may change: where and how the run is written, loaded and stopped, not
#: what it trains; the graph and the model are compared with graph.json by
#: :func:`check_resumable` (a resume reads no pretrained weights)
_RESUME_MAY_CHANGE = ("name", "run.", "graph.", "model.", "data.num_workers",
                      "data.prefetch_factor", "train.max_steps", "train.compile")


def _flat(tree: dict) -> dict[str, object]:
    """A recipe's sections as ``{"section.key": value}`` (top-level keys as they are)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_same_training(run_dir: Path, recipe: Recipe) -> None:
    """UserError when a resume asks to train ``run_dir`` otherwise than its ``recipe.yaml``
    records (another ``train.epochs``, learning rate, data, seed...): a resume continues the run
    as recorded and never rewrites that record. A run without a readable record passes."""
    from collabsurgery.config.recipe import load_recipe, recipe_to_dict

    try:
        recorded = load_recipe(run_dir / "recipe.yaml")
    except UserError:
        return
    old, new = (_flat(recipe_to_dict(r)) for r in (recorded, recipe))
    changed = [f"{k}={new.get(k)!r} (was {old.get(k)!r})" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(_RESUME_MAY_CHANGE)]
    if changed:
        raise UserError(f"{run_dir} was trained with another recipe: {', '.join(changed)}; a "
                        f"resume continues the run as its {run_dir / 'recipe.yaml'} records "
                        "(a longer run is a new run: choose another run.name)")


# graph arguments that change how a graph runs or starts, not what it computes or holds
_HOW_IT_RUNS = ("execution", "checkpoint_branches", "input_size", "copies")


def check_resumable(run_dir: Path, graph: TrainingGraph) -> None:
    """UserError when an existing run was trained with another training graph than now."""
    saved_file = run_dir / "graph.json"
    if not saved_file.is_file():
        return
    saved = config_from_json(saved_file.read_text())
    wanted = json.loads(graph.config.to_json())  # tuples as lists, as in the file
    old, new = ({k: v for k, v in args.items() if k not in _HOW_IT_RUNS}
                for args in (saved.args, wanted["args"]))
    changed = [f"{k}={new.get(k)!r} (was {old.get(k)!r})"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if saved.kind != wanted["kind"]:
        changed.insert(0, f"pattern={wanted['kind']!r} (was {saved.kind!r})")
    if not changed:
        return
    raise UserError(f"{run_dir} was trained with another training graph: "
                    + ", ".join(changed) + "; resume it with its own recipe "
                    f"({run_dir / 'recipe.yaml'}) or choose another run.name")


def check_compile(options: bool | dict) -> None:
    """UserError (one line, why) when ``torch.compile`` with ``options`` (``train.compile``)
    cannot run here: a tiny function is compiled and run first, so an unsupported Python, a
    missing C++ compiler or a bad argument shows before the model is traced."""
    import torch

    kwargs = options if isinstance(options, dict) else {}
    try:
        torch.compiler.reset()  # a fresh probe, not a cached success
        probe = torch.compile(lambda x: (x * 2).sin(), **kwargs)
        probe(torch.ones(4))
    except Exception as err:  # noqa: BLE001 -- any failure is the answer, reworded
        raise UserError(f"recipe key 'train.compile' is {options!r}, but torch.compile cannot "
                        f"run here ({first_line(err)}); set train.compile=false, or e.g. "
                        "train.compile={backend: aot_eager} when no C++ compiler is installed"
                        ) from None
