"""The main job: collaborative learning against its single-model baseline on the built-in
digits, then export.

Trains the demo recipe (CL-ILR with 4 hierarchical heads; any recipe works, e.g.
``recipes/demo-dml.yaml``) and the same recipe as one plain model (a peer group's first student),
prints both, exports the head ``collabsurgery export`` keeps (the method's choice, e.g.
OKDDip's leader; else the best on hold-out), and reloads it the way a user would
(``timm.create_model`` for timm models, ``load_backbone`` otherwise) to show that the exported
backbone gives the training graph's logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from collabsurgery.config.recipe import Recipe, data_arguments, load_recipe
from collabsurgery.data.datasets import load_splits
from collabsurgery.errors import UserError
from collabsurgery.export import load_backbone
from collabsurgery.export.from_run import export_from_source, load_run, run_weights
from collabsurgery.rundir.metrics import headline
from collabsurgery.train import engine

#: the single-model baseline of a recipe (+ its first model): one head on all the training data
BASELINE = ("graph={pattern: tree, heads: 1, split: []}", "objective={name: single}",
            "data.subsets=false")


def _reload(path: Path, spec) -> torch.nn.Module:
    """The export loaded the way a user would: timm's own loader for timm models."""
    if spec.library != "timm":
        return load_backbone(path)
    num_classes = spec.kwargs["num_classes"]
    return timm.create_model(spec.name, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes))


def _print_table(rows: list[tuple[str, dict]]) -> None:
    print(f"\n{'test accuracy':<34} {'head 0':>8} {'best head':>10} {'ensemble':>9}")
    for label, h in rows:
        print(f"{label:<34} {h['head0_test_acc']:>8.4f} {h['best_head_test_acc']:>10.4f} "
              f"{h['ensemble_test_acc']:>9.4f}")


def _train_all(runs: Sequence[tuple[str, Recipe]]) -> list[tuple[str, dict]]:
    """Train (or resume) each labelled recipe; the headline of each one's last epoch."""
    rows = []
    for label, recipe in runs:
        print(f"== training {label}: {recipe.name} ({recipe.model.name})")
        run_dir = engine.train(recipe)
        rows.append((label, headline(engine.history_of(run_dir)[-1])))
    return rows


def pretraining_run(recipe_path: str | None, recipe: Recipe) -> Path | None:
    """For a fine-tuning recipe whose ``model.pretrained`` names a training run directory: that
    directory, trained first (or resumed; a finished run is reused) from the recipe of the same
    name beside ``recipe_path`` (``runs/demo-pretrain`` <- ``recipes/demo-pretrain.yaml``).
    None for any other recipe."""
    source = recipe.model.pretrained
    if not isinstance(source, str) or Path(source).is_file() or recipe_path is None:
        return None
    run_dir = Path(source)
    pre_file = Path(recipe_path).parent / f"{run_dir.name}.yaml"
    if not pre_file.is_file():
        if (run_dir / "graph.json").is_file():
            return run_dir
        raise UserError(f"model.pretrained {source} is neither a file nor a training run, and "
                        f"there is no recipe {pre_file} to pre-train it with")
    return pre_file


def teacher_run(recipe_path: str | None, recipe: Recipe, overrides: Sequence[str]) -> None:
    """For a KD recipe whose ``objective.teacher`` names a training run directory that does not
    exist yet: train it first from the recipe of the same name beside ``recipe_path``
    (``runs/demo`` <- ``recipes/demo.yaml``), with the demo's ``overrides``. A finished teacher
    run is used as it is."""
    teacher = recipe.objective.args.get("teacher")
    if not isinstance(teacher, str) or recipe_path is None:
        return
    run_dir = Path(teacher)
    teacher_file = Path(recipe_path).parent / f"{run_dir.name}.yaml"
    if run_dir.exists() or not teacher_file.is_file():
        return
    teacher_recipe = load_recipe(teacher_file, [*overrides, f"run.dir={run_dir.parent}",
                                                f"run.name={run_dir.name}"])
    _train_all([("the teacher", teacher_recipe)])


def run_transfer_demo(recipe_path: str, overrides: Sequence[str] = ()) -> None:
    """Pre-train (or reuse) a backbone on the first task, then fine-tune it on the second with
    the recipe's method, beside the same fine-tune as a single model and a single model trained
    from scratch; prints the three."""
    tuned = load_recipe(recipe_path, ["run.resume=auto", *overrides])
    source = Path(tuned.model.pretrained)
    pre_file = pretraining_run(recipe_path, tuned)
    if pre_file is not None and pre_file.suffix == ".yaml":
        pre = load_recipe(pre_file, ["run.resume=auto", *overrides, f"run.dir={source.parent}",
                                     f"run.name={source.name}"])
        print(f"== pre-training {pre.name} ({pre.model.name}) on {pre.data.source}, "
              f"classes {pre.data.classes or 'all'}")
        pre_row = _train_all([("pre-training", pre)])[0][1]
        print(f"pre-training task: test accuracy {pre_row['head0_test_acc']:.4f}")
    single = load_recipe(recipe_path, ["run.resume=auto", *overrides, *BASELINE,
                                       f"name={tuned.name}-single"])
    scratch = load_recipe(recipe_path, ["run.resume=auto", *overrides, *BASELINE,
                                        "model.pretrained=null", f"name={tuned.name}-scratch"])
    method = f"{tuned.objective.name} ({tuned.graph.pattern}), fine-tuned"
    rows = _train_all([("single model, from scratch", scratch),
                       ("single model, fine-tuned", single), (method, tuned)])
    _print_table(rows)


def run_demo(recipe_path: str | None, overrides: Sequence[str] = ()) -> Path | None:
    """Train both runs (resuming finished or interrupted ones), compare, export; returns the file.
    A fine-tuning recipe (``model.pretrained`` naming a run to pre-train) runs
    :func:`run_transfer_demo` instead (returns None)."""
    collab = load_recipe(recipe_path, ["run.resume=auto", *overrides])
    if pretraining_run(recipe_path, collab) is not None:
        run_transfer_demo(recipe_path, overrides)
        return None
    models = collab.model.name if isinstance(collab.model.name, list) else [collab.model.name]
    single = load_recipe(recipe_path, ["run.resume=auto", *overrides, *BASELINE,
                                       f"model.name={models[0]}", f"name={collab.name}-single"])
    # one head is a method too (BYOT's exits, KD's teacher) unless it is the baseline itself
    if len(models) < 2 and collab.graph.args.get("heads", 2) < 2 and \
            collab.objective.name == "single":
        raise UserError(f"the demo compares collaborative learning with a single model, but "
                        f"{recipe_path or 'this recipe'} trains one head (graph.heads=1) with "
                        f"objective single, the baseline itself; train "
                        f"it with: collabsurgery train --recipe {recipe_path or 'FILE'}")
    teacher_run(recipe_path, collab, overrides)
    method = f"{collab.objective.name} ({collab.graph.pattern})"
    _print_table(_train_all([("single model", single), (method, collab)]))

    run_dir = engine.run_directory(collab)
    # the head `collabsurgery export` keeps: the method's own choice, else the best on hold-out
    path, head = export_from_source(run_dir, None, run_dir / "exported_head.safetensors")
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
