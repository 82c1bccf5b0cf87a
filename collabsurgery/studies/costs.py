"""What each row's training graph costs against the plain model: time, memory, FLOPs, params.

Measured once a graph with :mod:`collabsurgery.measure.bench` at the study's image size and batch (rows
with the same graph share a measurement), and kept in the study's ``costs.json``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from collabsurgery.config.recipe import Recipe
from collabsurgery.graphs.saving import config_from_json
from collabsurgery.studies.spec import Row
from collabsurgery.studies.store import read_json, write_json
from collabsurgery.train import engine


def _cost_key(run_dir: Path, recipe: Recipe) -> str | None:
    """What a cost measurement depends on (rows with the same graph share one); None: no run."""
    if not (run_dir / "graph.json").is_file():
        return None
    cfg = config_from_json((run_dir / "graph.json").read_text())
    return json.dumps({"pattern": cfg.kind, "args": cfg.args,
                       "image_size": recipe.data.image_size, "batch_size": recipe.train.batch_size,
                       "precision": recipe.train.mixed_precision,
                       "channels_last": recipe.train.channels_last}, sort_keys=True)


def row_cost_key(recipes: Sequence[Recipe]) -> str | None:
    """The cost key of a row: that of its first started run (None before any has started)."""
    keys = [_cost_key(engine.run_directory(r), r) for r in recipes]
    return next((k for k in keys if k is not None), None)


def measure_costs(study_dir: Path, rows: Sequence[tuple[Row, Sequence[Recipe]]],
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bench every row's training graph once (it needs one started run for the graph file)."""
    import torch

    from collabsurgery.measure.bench import BenchConfig, run_bench

    path = study_dir / "costs.json"
    costs = read_json(path, {})
    for row, recipes in rows:
        key = row_cost_key(recipes)
        if key is not None and key in costs and "params_ratio" not in costs[key]:
            costs[key]["params_ratio"] = params_ratio(json.loads(key))  # measured before it was
            write_json(path, costs)
        if key is None or key in costs:
            continue
        k = json.loads(key)
        cuda = torch.cuda.is_available()
        precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[k["precision"]] if cuda \
            else "fp32"
        log(f"measuring the training graph of row {row.key} against the plain model")
        graph = dict(k["args"])
        model, model_kwargs = graph.pop("model"), graph.pop("model_kwargs")
        graph.pop("input_size")
        execution = graph.pop("execution", "loop")
        checkpoint_branches = graph.pop("checkpoint_branches", False)
        cfg = BenchConfig(model, pattern=k["pattern"], graph_args=graph,
                          image_size=k["image_size"], batch_size=k["batch_size"],
                          precision=precision, channels_last=k["channels_last"],
                          modes=(execution,), checkpoint=checkpoint_branches,
                          repeats=5, warmup=2, model_kwargs=dict(model_kwargs),
                          threads=None if cuda else 1, clock="wall" if cuda else "process")
        result = run_bench(cfg)
        entry = next(e for e in result["modes"] if e["checkpoint"] == checkpoint_branches)
        costs[key] = {**{f: entry[f] for f in ("time_ratio", "time_ratio_min", "mem_ratio",
                                              "flop_ratio", "stage_limit_ratio", "mode")},
                      "device": result["device"], "clock": result["clock"],
                      "mem_method": result["mem_method"], "precision": precision,
                      "repeats": cfg.repeats, "warmup": cfg.warmup,
                      "plain_step_ms": result["plain"]["step_ms"], "step_ms": entry["step_ms"],
                      "params_ratio": params_ratio(k)}
        write_json(path, costs)
    return costs


def params_ratio(key: dict[str, Any]) -> float:
    """Parameters of the training graph of a cost key over the plain model's (head 0's
    backbone): every copy of a module counted once, shared modules once."""
    import torch

    from collabsurgery.graphs import GraphConfig, rebuild
    from collabsurgery.models.backbones import create

    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the RNG be
        net = rebuild(GraphConfig(key["pattern"], key["args"]))
        plain = create(net.head_spec(0))
    return sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in plain.parameters())
