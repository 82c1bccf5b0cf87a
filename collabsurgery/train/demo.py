"""The main job: collaborative learning against its single-model baseline on the built-in
digits, then export.

Trains the demo recipe (CL-ILR with 4 hierarchical heads; any recipe works, e.g.
``recipes/demo-dml.yaml``) and the same recipe as one plain model (a peer group's first student),
prints both, exports the best head on hold-out, and reloads it the way a user would
(``timm.create_model`` for timm models, ``load_backbone`` otherwise) to show that the exported
backbone gives the training graph's logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from collabsurgery.config.recipe import data_arguments, load_recipe
from collabsurgery.data.datasets import load_splits
from collabsurgery.errors import UserError
from collabsurgery.export import load_backbone
from collabsurgery.export.from_run import export_from_source, load_run, run_weights
from collabsurgery.rundir.metrics import headline
from collabsurgery.train import engine

BASELINE = ("graph={pattern: tree, heads: 1, split: []}", "objective={name: single}")  # + model 0


def _reload(path: Path, spec) -> torch.nn.Module:
    """The export loaded the way a user would: timm's own loader for timm models."""
    if spec.library != "timm":
        return load_backbone(path)
    num_classes = spec.kwargs["num_classes"]
    return timm.create_model(spec.name, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes))


def run_demo(recipe_path: str | None, overrides: Sequence[str] = ()) -> Path:
    """Train both runs (resuming finished or interrupted ones), compare, export; returns the file."""
    collab = load_recipe(recipe_path, ["run.resume=auto", *overrides])
    models = collab.model.name if isinstance(collab.model.name, list) else [collab.model.name]
    single = load_recipe(recipe_path, ["run.resume=auto", *overrides, *BASELINE,
                                       f"model.name={models[0]}", f"name={collab.name}-single"])
    if len(models) < 2 and collab.graph.args.get("heads", 2) < 2:
        raise UserError("the demo compares collaborative learning with a single model; "
                        "graph.heads must be >= 2")
    rows = []
    method = f"{collab.objective.name} ({collab.graph.pattern})"
    for label, recipe in (("single model", single), (method, collab)):
        print(f"== training {label}: {recipe.name} ({recipe.model.name})")
        run_dir = engine.train(recipe)
        rows.append((label, headline(engine.history_of(run_dir)[-1])))

    print(f"\n{'test accuracy':<28} {'head 0':>8} {'best head':>10} {'ensemble':>9}")
    for label, h in rows:
        print(f"{label:<28} {h['head0_test_acc']:>8.4f} {h['best_head_test_acc']:>10.4f} "
              f"{h['ensemble_test_acc']:>9.4f}")

    run_dir = engine.run_directory(collab)
    path, head = export_from_source(run_dir, "best", run_dir / "best_head.safetensors")
    net, _ = load_run(run_dir, run_weights(run_dir))
    spec = net.head_spec(head)
    model = _reload(path, spec)
    test = load_splits(**data_arguments(collab.data), seed=collab.seed).test
    images = torch.stack([test[i][0] for i in range(16)])
    with torch.no_grad():
        difference = (model.eval()(images) - net(images)[head]).abs().max().item()
    loader = "timm.create_model(pretrained=True)" if spec.library == "timm" else "load_backbone"
    print(f"\nexported head {head} ({spec.qualified_name}) to {path}; reloaded with {loader}: "
          f"max |logit difference| vs the training graph = {difference:.2e}")
    return path
