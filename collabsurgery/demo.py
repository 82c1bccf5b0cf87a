"""The main job: CL-ILR against its single-model baseline on the built-in digits, then export.

Trains the demo recipe (4 hierarchical heads) and the same recipe as one plain model, prints
both, exports the best head on hold-out, and reloads it through ``timm.create_model`` to show
that the exported backbone gives the training graph's logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from . import engine
from .data import load_splits
from .errors import UserError
from .recipe import data_arguments, load_recipe
from .reporting import headline
from .runs import export_from_source, load_run

BASELINE = ("graph={pattern: tree, heads: 1, split: []}", "objective={name: single}")


def run_demo(recipe_path: str | None, overrides: Sequence[str] = ()) -> Path:
    """Train both runs (resuming finished or interrupted ones), compare, export; returns the file."""
    collab = load_recipe(recipe_path, ["run.resume=auto", *overrides])
    single = load_recipe(recipe_path, ["run.resume=auto", *overrides, *BASELINE,
                                       f"name={collab.name}-single"])
    if collab.graph.args.get("heads", 2) < 2:
        raise UserError("the demo compares collaborative learning with a single model; "
                        "graph.heads must be >= 2")
    rows = []
    for label, recipe in (("single model", single), ("CL-ILR", collab)):
        heads = recipe.graph.args.get("heads", "?")
        print(f"== training {label}: {recipe.name} ({recipe.model.name}, {heads} heads)")
        run_dir = engine.train(recipe)
        rows.append((label, headline(engine.history_of(run_dir)[-1])))

    print(f"\n{'test accuracy':<28} {'head 0':>8} {'best head':>10} {'ensemble':>9}")
    for label, h in rows:
        print(f"{label:<28} {h['head0_test_acc']:>8.4f} {h['best_head_test_acc']:>10.4f} "
              f"{h['ensemble_test_acc']:>9.4f}")

    run_dir = engine.run_directory(collab)
    path, head = export_from_source(run_dir, "best", run_dir / "best_head.safetensors")
    net, _ = load_run(run_dir)
    num_classes = net.head_spec(head).kwargs["num_classes"]
    model = timm.create_model(collab.model.name, pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes))
    test = load_splits(**data_arguments(collab.data), seed=collab.seed).test
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        difference = (model.eval()(images) - net(images)[head]).abs().max().item()
    print(f"\nexported head {head} to {path}; reloaded with timm.create_model(pretrained=True): "
          f"max |logit difference| vs the training graph = {difference:.2e}")
    return path
