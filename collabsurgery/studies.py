"""Paper studies: a table as a grid of recipes over seeds, resumable, with a computed report.

    collabsurgery reproduce clilr-table1 --seeds 3 --budget small
    python tools/reproduce.py clilr-noise --budget full data.source=/data/cifar10

**The studies** are plain data: a budget's base recipe plus, per row, a short list of
``dotted.key=value`` overrides, put through :func:`~collabsurgery.recipe.load_recipe` by
:func:`recipe_for`, so every run is strictly validated. The paper numbers beside ours are the
papers' (test error %, mean and std); ours are only ever read from the runs' files.

**Running.** A study lives in ``<root>/<study>-<budget>/``:

    runs/<row>-seed<k>/   ordinary run directories (recipe.yaml, metrics.jsonl, summary.json, ...)
    study.json            every call: command, code version (git), runs trained or stopped
    timings.json          wall seconds this machine spent training each run
    costs.json            time / memory / FLOP ratios of each training graph (bench, once a graph)
    results.json, report.md, errors.png (and curves.png)   rewritten at the end of every call

A run is finished when its ``summary.json`` exists and its latest checkpoint has all
``train.epochs`` epochs; finished runs are never trained again. Any other run is trained with
``run.resume=auto``, so an interrupted one continues from its last checkpoint. A run directory
made with other settings (say, another ``train.epochs``) is an error, never silently mixed in.

**The report** reads each finished run's ``summary.json`` (the engine's last-epoch metrics),
aggregates per row (mean and sample std over seeds of the test error, ``100 * (1 - accuracy)``,
of head 0, of the best head on hold-out and of the ensemble), and times each row's training graph
against the plain model with :mod:`collabsurgery.bench` at the study's image size and batch (and
counts its parameters against the plain model's). A study may list :class:`Extra` numbers of
the summaries to show beside the errors, a column each (``cgl-ablation``: the heads' diversity).
A study whose students differ (a ResNet and a WRN, say) gives each row :class:`Cell` entries:
one column per student, each cell reading one head (an index, ``best`` on hold-out, or
``last``), beside the paper's number and the mean difference to the column's baseline row over
paired seeds.

**How the small budget was chosen** (2 shared CPU cores, ``--seeds 3``, about 30 minutes a
study): the digits are 8x8 images, so 12 px loses nothing and costs about half of 16 px; one torch
thread was several times faster than two on a busy 2-core machine (the runner sets it when there
is no GPU); ResNet-20, the papers' smallest CIFAR ResNet, keeps ResNet-32's three stages and split
points. Timed at 12 px on all 1294 training examples with one thread, 15 epochs took 20-35 s for
a single model and 40-60 s for 2 instances or 4 hierarchical heads: about 13 minutes for
clilr-table1, 10 for clilr-rescaling and 25 for clilr-noise (3 setups x 5 noise levels) with 3
seeds. Test error is then about 1 % at noise 0 and the test split has 359 images (one is 0.28
points), so seed noise is of the size of paper 000's Table 1 differences; the label-noise study
separates the setups far more clearly.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from . import engine
from .reporting import pyplot, save_figure
from .errors import TrainingStopped, UserError
from .graphfile import config_from_json
from .recipe import Recipe, load_recipe, parse_overrides, recipe_to_dict

__all__ = ["BUDGETS", "DIVERSITY", "STUDIES", "Budget", "Cell", "Extra", "Row", "Study",
           "cell_error", "collect", "get_study", "head_error", "holdout_epoch_error",
           "measure_costs", "recipe_for", "run_state",
           "run_study", "study_directory", "summary_value", "write_report"]


# ============================================================================ the studies

# ---------------------------------------------------------------------------- building blocks

#: the graph + objective of each setup in paper 000; every row states all of them, so a row
#: means the same thing whatever the base recipe says
SINGLE = ("graph.pattern=tree", "graph.heads=1", "graph.split=[]", "graph.branches=null",
          "objective={name: single}")
LABEL_SMOOTHING = (*SINGLE[:-1], "objective={name: label_smoothing, smoothing: 0.05}")
CONSENSUS = ("objective.name=consensus",)


def instances(heads: int) -> tuple[str, ...]:
    return ("graph.pattern=instances", f"graph.heads={heads}", "graph.split=null",
            "graph.branches=null", *CONSENSUS)


def shared(heads: int, split: str, branches: str = "null", rescale: str = "backprop"
           ) -> tuple[str, ...]:
    return ("graph.pattern=tree", f"graph.heads={heads}", f"graph.split=[{split}]",
            f"graph.branches={branches}", f"graph.rescale={rescale}", *CONSENSUS)


SIMPLE2 = shared(2, "layer1")
HIER4 = shared(4, "layer1,layer2", "[2,2]")

#: paper 003's two students, each its own network (ResNet-20 stands in for its ResNet-32)
PEERS = ("graph={pattern: peers}", "model.name=[cifar_resnet20, cifar_wrn16_2]")
SHARED_VIEWS = ("data.views=shared",)


#: paper 002's Collaborative Group Learning. Every CGL study row states the whole graph section,
#: the objective, data.subsets and the optimizer (one optimizer for all rows: see the notes)
ADAM = ("train.optimizer=adam", "train.lr=0.003", "train.weight_decay=0.0",
        "train.batch_size=32")
SUBSETS, NO_SUBSETS = ("data.subsets=true",), ("data.subsets=false",)
#: every block boundary of ResNet-20 (`collabsurgery splits cifar_resnet20`): 10 layers of
#: modules, as paper 002 cuts its ResNet-18 at every block boundary into 9
RESNET20_BLOCKS = ("layer1.0,layer1.1,layer1,layer2.0,layer2.1,layer2,layer3.0,layer3.1,"
                   "layer3")


def routed(students: int, split: str = RESNET20_BLOCKS, modules: int = 2) -> tuple[str, ...]:
    """Paper 002's random routing: ``students`` paths through ``modules`` modules a layer."""
    return (f"graph={{pattern: routed, split: [{split}], modules: {modules}, "
            f"students: {students}}}",)


def cgl(probability: float) -> tuple[str, ...]:
    """Paper 002's sub-group imitation (T=3, KL ramped up over the first 20% of training)."""
    return (f"objective={{name: cgl, probability: {probability}, temperature: 3.0, "
            "rampup: [0.0, 0.2]}",)


def kdcl(target: str, icl: bool = False) -> tuple[str, ...]:
    """Paper 003's KDCL with ensemble target ``target``; ``icl``: each student its own view."""
    return (*PEERS, f"objective={{name: kdcl, target: {target}}}",
            f"data.views={'per_head' if icl else 'shared'}")


@dataclass(frozen=True)
class Cell:
    """A row's entry in one column of a per-student table: the test error of one head."""

    column: str                 # the column's label, the same in every row
    head: str                   # "0", "1", ...: that head; "best": best on hold-out; "last"
    paper: float | None = None  # the paper's test error % there (None: not in the paper)
    baseline: bool = False      # differences in this column are taken against this row
    epoch: str = "last"         # "last": the last epoch's test error; "holdout": see below


def head_error(summary: dict[str, Any], head: str) -> float:
    """Test error % of the head that ``head`` selects in a run's ``summary.json``."""
    final = summary["final"]
    accs = final["test"]["head_acc"]
    index = {"best": final["holdout"]["best_head"], "last": len(accs) - 1}.get(head)
    return 100 * (1 - accs[int(head) if index is None else index])


def holdout_epoch_error(history: Sequence[dict[str, Any]], head: int) -> tuple[float, int]:
    """Test error % of ``head`` at the epoch where its hold-out accuracy was highest (the
    latest such epoch on a tie), and that epoch: the epoch chosen on the hold-out split, where a
    paper that reports its lowest test error over all epochs chooses on the test set."""
    if not history or "holdout" not in history[0]:
        raise ValueError("selecting an epoch on the hold-out split needs a hold-out split "
                         "(data.holdout_fraction > 0)")
    chosen = max(history, key=lambda e: (e["holdout"]["head_acc"][head], e["epoch"]))
    return 100 * (1 - chosen["test"]["head_acc"][head]), chosen["epoch"]


def cell_error(cell: Cell, summary: dict[str, Any], history: Sequence[dict[str, Any]]) -> float:
    """The test error % a cell reads from a run: its summary, or its per-epoch history."""
    if cell.epoch == "holdout":
        return holdout_epoch_error(history, int(cell.head))[0]
    return head_error(summary, cell.head)


#: the keys results.json already gives each row and each run (an Extra may not reuse them)
_RESULT_KEYS = {"key", "label", "series", "x", "paper", "runs", "cost", "columns", "run", "seed",
                "epoch", "test_examples", "best_head", "wall_s", "head0_err", "best_err",
                "ensemble_err"}


@dataclass(frozen=True)
class Extra:
    """A number of every finished run's ``summary.json`` that a study shows per row: one more
    column of the per-row table (mean ± std over seeds; — where no run has it)."""

    key: str          # its key in results.json (per row and per run)
    path: str         # where it is in summary.json, dotted: "final.test.diversity"
    label: str        # the column's header
    about: str = ""   # one sentence under the table: what it is
    digits: int = 2   # decimals shown


def summary_value(summary: dict[str, Any], path: str) -> float | None:
    """The number at dotted ``path`` of a run's ``summary.json``; None where it is absent."""
    value: Any = summary
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return None if value is None else float(value)


#: paper 002's diversity of the students, as the engine records it on the test split
DIVERSITY = Extra("diversity", "final.test.diversity", "diversity",
                  "diversity: the mean over test examples and over pairs of heads of the L2 "
                  "distance between their probability vectors (paper 002, Table 6 and Fig. 4; "
                  "— for one head)", digits=3)


@dataclass(frozen=True)
class Row:
    """One setup of a study: ``key`` names its runs (``<key>-seed<k>``)."""

    key: str
    label: str
    overrides: tuple[str, ...]
    paper: tuple[float, float] | None = None  # the paper's test error %: (mean, std)
    series: str | None = None  # line plots: the curve this row belongs to ...
    x: float | None = None     # ... and its x value
    budgets: tuple[str, ...] = ("small", "full")
    cells: tuple[Cell, ...] = ()  # per-student columns (students of different architectures)


@dataclass(frozen=True)
class Study:
    """A paper table (or figure) as rows; ``needs`` names a method that has not landed yet."""

    name: str
    title: str
    source: str                 # where the paper numbers come from
    rows: tuple[Row, ...] = ()
    baseline: str | None = None  # the row that differences are taken against
    x_label: str | None = None   # rows with series/x: plot error against this
    needs: str | None = None
    notes: str = ""              # for the report: what was left out, time per seed, ...
    extras: tuple[Extra, ...] = ()  # more numbers of the runs' summary.json, a column each

    def __post_init__(self) -> None:
        cells = [c for row in self.rows for c in row.cells]
        for c in cells:
            if not (c.head.isdigit() or c.head in ("best", "last")):
                raise ValueError(f"study {self.name}: head selector {c.head!r} is not an "
                                 "index, 'best' or 'last'")
            if c.epoch not in ("last", "holdout") or (c.epoch == "holdout"
                                                       and not c.head.isdigit()):
                raise ValueError(f"study {self.name}: epoch selector {c.epoch!r} is not 'last' "
                                 "or 'holdout' (with a head index)")
        for column in {c.column for c in cells}:
            if sum(c.baseline for c in cells if c.column == column) > 1:
                raise ValueError(f"study {self.name}: column {column!r} has several baselines")
        keys = [e.key for e in self.extras]
        for key in keys:
            if key in _RESULT_KEYS or keys.count(key) > 1:
                raise ValueError(f"study {self.name}: extra key {key!r} is taken")

    def rows_for(self, budget: str) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if budget in r.budgets)


@dataclass(frozen=True)
class Budget:
    """How big every run of a study is: a base recipe and overrides applied before the rows."""

    name: str
    base: str | None            # a recipe file under the repository's recipes/, or None: defaults
    overrides: tuple[str, ...]
    seeds: int                  # default --seeds
    dataset: str                # in words, for the report
    needs_source: bool = False  # data.source must be given (and not the built-in digits)
    why: str = ""               # how the budget was chosen, for the report


BUDGETS = {
    "small": Budget(
        "small", None,
        ("model.name=cifar_resnet20", "data.source=builtin:digits", "data.image_size=12",
         "data.augment=true", "data.hflip=false", "data.label_noise=0.0",
         "data.max_train_examples=null", "train.epochs=15", "train.batch_size=64",
         "train.lr=0.1", "train.momentum=0.9", "train.nesterov=true",
         "train.weight_decay=5.0e-4", "train.schedule=cosine", "train.warmup_epochs=1",
         "train.mixed_precision=no", "run.checkpoint_every=0", "run.keep=1"),
        seeds=3, dataset="scikit-learn handwritten digits (built in, real data)",
        why="sized for a study of 3 seeds in about half an hour on 2 shared CPU cores: the "
            "digits are 8x8 images, so 12 px loses nothing and costs about half of 16 px; one "
            "torch thread (faster than two on a busy 2-core machine); ResNet-20 keeps the three "
            "stages and split points of the paper's ResNet-32; the epochs were set from timed "
            "runs, long enough for the single model to converge. Each run's wall time is in "
            "the Runs table."),
    # paper 000's CIFAR-10 setting (supplement, section 2): the shipped ResNet-32 recipe
    "full": Budget(
        "full", "cifar10-resnet32-clilr-hier4.yaml", ("run.keep=1",), seeds=5,
        dataset="CIFAR-10", needs_source=True,
        why="paper 000's CIFAR-10 setting (its supplement, section 2), from the shipped recipe "
            "recipes/cifar10-resnet32-clilr-hier4.yaml."),
}

# ---------------------------------------------------------------------------- definitions

_T1 = "paper 000 Table 1 (CIFAR-10, ResNet-32, 5 runs)"
_NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8)
_NOISE_SETUPS = (("single", "single model", SINGLE, ("small", "full")),
                 ("hier4", "4 heads, hierarchical sharing", HIER4, ("small", "full")),
                 ("instances2", "2 instances", instances(2), ("small", "full")))

# paper 003 (KDCL) Table 7: a ResNet and a WRN student, one column each
_RESNET, _WRN = "ResNet-20 (paper: ResNet-32)", "WRN-16-2"


def _err(accuracy: float) -> float:
    """The paper's accuracy % as test error %."""
    return round(100 - accuracy, 2)


def _students(resnet: float, wrn: float) -> tuple[Cell, Cell]:
    """Peers: head 0 is the ResNet, head 1 the WRN (the papers' accuracies %)."""
    return Cell(_RESNET, "0", _err(resnet)), Cell(_WRN, "1", _err(wrn))


#: paper 003 Table 7's KDCL rows: (target, label, accuracies %, accuracies % with ICL)
_KDCL_ROWS = (("naive", "Naive", (73.7, 74.8), (73.8, 74.9)),
              ("linear", "Linear", (73.4, 74.6), (73.6, 74.9)),
              ("minlogit", "MinLogit", (73.0, 74.1), (73.5, 74.6)),
              ("general", "General", (74.0, 75.2), (74.3, 75.5)))
_SMALL = ("small",)  # a full budget would need paper 003's CIFAR-100 recipe
# ONE and OKDDip ramp their KL weight up over 4 of the 15 epochs: the share of their reference
# code's 80 of 300 (their default, 80 epochs, would leave it near 0 on the small budget)
_ONE = ("model.name=cifar_resnet20", "graph={pattern: tree, heads: 3, split: [layer2]}",
        "objective={name: one, rampup_epochs: 4}", *SHARED_VIEWS)
_OKDDIP = ("model.name=cifar_resnet20",
           "graph={pattern: tree, heads: 4, split: [layer2, global_pool], branches: [4, 1]}",
           "objective={name: okddip, rampup_epochs: 4}", *SHARED_VIEWS)

# paper 002 (CGL): Table 4's ablation beside Table 2's baseline, CL-ILR and CGL (CIFAR-100,
# ResNet-18), one column: the student that is best on hold-out, the paper's choice
_BEST = "best student on hold-out"
_K, _P = 4, 0.5  # students and imitation probability on the digits (see _CGL_NOTES)
# paper 002's CL-ILR: "all students share the first several blocks of layers and separate from
# the last block" with 3 students (paper 000's backprop rescaling, consensus)
_CLILR = (*shared(3, "layer2"), *NO_SUBSETS)


# paper 004 Table I: (key, label, dropout views, loss weights, the paper's ResNet-18 CIFAR-100 %)
_INTRA_MID, _INTRA_PP, _INTRA_KERNEL = ({"mid_weight": 1.0}, {"pull_push_weight": 0.01},
                                        {"kernel_weight": 0.01})
_INTRA_ROWS = (
    ("baseline", "baseline (one view: dropout, plain CE)", 1, {}, 22.98),
    ("out", "L_out (4 dropout views)", 4, {"out": True}, 22.02),
    ("mid", "L_mid", 1, _INTRA_MID, 21.93),
    ("pull-push", "L_pull-push", 1, _INTRA_PP, 22.27),
    ("kernel", "L_kernel", 1, _INTRA_KERNEL, 22.55),
    ("out-mid-pp", "L_out + L_mid + L_pull-push", 4,
     {"out": True, **_INTRA_MID, **_INTRA_PP}, 22.03),
    ("pp-mid-kernel", "L_pull-push + L_mid + L_kernel", 1,
     {**_INTRA_PP, **_INTRA_MID, **_INTRA_KERNEL}, 20.93),
)
_INTRA_HOLDOUT = "ResNet-20, epoch chosen on hold-out (paper: ResNet-18)"
_INTRA_LAST = "ResNet-20, last epoch"


def _intra_graph(views: int) -> str:
    """Dropout after layer2 and before the classifier (4 views, or 1 with samples=1: the plain
    network with its dropouts), local points layer1 and layer2."""
    return (f"graph={{pattern: dropout, split: [layer2, global_pool], samples: "
            f"{2 if views > 1 else 1}, p: 0.2, local: [layer1, layer2]}}")


def _intra_objective(views: int, out: bool = False, **weights: float) -> str:
    """The intra objective with L_out's soft term on (``out``) or CE alone, plus ``weights``."""
    args = {"alpha_out": 0.5 if out else 1.0, "mid_weight": 0.0, "pull_push_weight": 0.0,
            "kernel_weight": 0.0, **weights}
    return "objective={name: intra, " + ", ".join(f"{k}: {v}" for k, v in args.items()) + "}"


_INTRA_NOTES = (
    "Setting (small budget): ResNet-20 at 12 px, not the paper's ResNet-18 (three FC layers, two "
    "dropouts) at 32 px; the dropouts (p=0.2) are inserted after layer2 and before the "
    "classifier, so L_out rows have 2 x 2 = 4 views and the other rows run the same network "
    "with one view (dropout on, CE only: the baseline). L_mid and pull-push read layer1 and "
    "layer2 and train only their last block. Weights: alpha_out=0.5, T=2, "
    "alpha_mid=beta_mid=0.05 (the paper's), pull-push weight 0.01 with alpha_pull 0.5 -> 1.0 "
    "and alpha_push 0.5 -> 0.1 over depth, kernel weight 0.01 on layer2 and layer3 (our "
    "choices: the paper grid-searched its weights and does not give them). Selection: the "
    "paper reports the lowest test error over all epochs of one run, which chooses the epoch "
    "on the test set; our first column chooses it on the hold-out split (the epoch of the "
    "highest hold-out accuracy, the latest on a tie) and reports the test error there, the "
    "second is the last epoch's test error; both are means over seeds with paired "
    "differences to the baseline. The 'baseline (2x)' column (twice the filters) is left out.")


def _cgl_cell(accuracy: float, baseline: bool = False) -> Cell:
    return Cell(_BEST, "best", _err(accuracy), baseline=baseline)


_CGL_NOTES = (
    "Setting (small budget). All rows train with one optimizer, Adam (lr 0.003, cosine after "
    "1 warm-up epoch, no weight decay, batch 32: recipes/demo-cgl.yaml's digits setting; "
    "the paper: Adam, lr 0.001, batch 64, no weight decay given) instead of the budget's SGD, "
    "so that the baseline and CL-ILR differ from CGL by the method, not the optimizer. With "
    "data.subsets the batch is per student: each step every student takes 32 examples of its "
    "own subset, so an epoch is one pass over the training set split among the students. "
    f"K={_K} students, not the paper's 8: the 1294 training digits split 8 ways leave about "
    "160 a student (16 a class, about 5 steps an epoch), against the paper's 5,600 (56 a "
    "class); 4 ways leave about 320 (32 a class). p=0.5, not the paper's 0.25: it keeps the "
    "expected sub-group size p(K-1) near the paper's (1.5 against 1.75); at p=0.25 with 4 "
    "students 42% of the sub-groups would be empty. The modular network is ResNet-20 cut at "
    "every block boundary (10 layers of modules, 2 modules each), as the paper cuts its "
    "ResNet-18 into 9: random routing then shares modules at random depths, the fine-grained "
    "sharing Table 4's 'w/o RR' takes away (demo-cgl's 3 coarse layers would share modules "
    "at 3 depths only). w/o RR: 4 independent ResNet-20s (4x the parameters), each on its "
    "own subset, with the same imitation; w/o SDL: every student "
    "sees all the data (one shared batch a step, so about 4x the compute of CGL an epoch); "
    "w/o SGI: every student imitates all others every step (p=1). CL-ILR as paper 002 ran it: "
    "3 heads sharing everything up to the last stage (layer3 and the classifier branch; "
    "paper 000's best, 4 hierarchical heads, would not be the network behind paper 002's "
    "number). Every row is read at the student that is best on the hold-out split, as the "
    "paper evaluates; head 0 and the ensemble are in the second table. Diversity: paper 002 "
    "Table 6 gives 0.535 with sub-set data and 0.178 without (both without sub-group "
    "imitation, i.e. like the w/o SGI row and a row with neither), and Fig. 4 shows it "
    "falling as p grows. params x: the training graph's parameters over one ResNet-20's: 2 "
    "for CGL whatever K (Fig. 3b), K for independent networks. time x, memory x and FLOPs x "
    "are one step of the graph on ONE shared batch of 32, without the imitation forwards: "
    "for rows with sub-set data a step runs each student on its own batch, so compare their "
    "training cost by the wall times in the Runs table. Time on the small budget, one torch "
    "thread, an idle 2-core CPU: one run of cgl took 18 s and one of w/o SDL (the heaviest: "
    "4 students on every batch) 38 s; the other rows do about as much work as cgl or less "
    "(estimated 15-30 s), so one seed (6 runs) takes about 2.5 minutes and --seeds 5 about "
    "13, up to twice that on a busy CPU.")

STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("clilr-table1", "CL-ILR: training graphs against individual learning", _T1,
          baseline="single", rows=(
              Row("single", "single instance", SINGLE, (6.66, 0.21)),
              Row("label-smoothing", "label smoothing (0.05)", LABEL_SMOOTHING, (6.83, 0.14)),
              Row("instances2", "2 instances", instances(2), (6.19, 0.17)),
              Row("instances4", "4 instances", instances(4), (6.16, 0.17)),
              Row("simple2", "2 heads, simple ILR sharing (layer1)", SIMPLE2, (5.97, 0.07)),
              Row("hier4", "4 heads, hierarchical ILR sharing (layer1, layer2)", HIER4,
                  (5.86, 0.13)))),
    Study("clilr-rescaling", "CL-ILR: 4 heads sharing up to layer1, gradient rescaling",
          "paper 000 Table 3 (CIFAR-10, ResNet-32)", baseline="none", rows=(
              Row("none", "no scaling", shared(4, "layer1", rescale="none"), (6.04, 0.17)),
              Row("loss", "loss scaling (1/4)", shared(4, "layer1", rescale="loss"),
                  (6.09, 0.24)),
              Row("backprop", "backprop rescaling", shared(4, "layer1", rescale="backprop"),
                  (5.82, 0.08)))),
    Study("clilr-noise", "CL-ILR: test error against label noise",
          "paper 000 Figure 3 (CIFAR-10, ResNet-32; no table numbers)", baseline=None,
          x_label="label noise (fraction of training labels redrawn every epoch)", rows=tuple(
              Row(f"{key}-noise{level:g}", f"{label}, noise {level:g}",
                  (*overrides, f"data.label_noise={level}"), series=label, x=level,
                  budgets=budgets)
              for key, label, overrides, budgets in _NOISE_SETUPS for level in _NOISE_LEVELS)),
    Study("cgl-ablation", "CGL: random routing, sub-set data and sub-group imitation, each "
          "left out, against a single model and CL-ILR",
          "paper 002 Table 4 (ablation) and Table 2 (baseline, CL-ILR, CGL), CIFAR-100, "
          "ResNet-18, 8 students, 2 modules a layer, p=0.25; test error = 100 - the paper's "
          "accuracy, mean of 3 runs (Table 4 gives no std)",
          extras=(DIVERSITY,), notes=_CGL_NOTES, rows=(  # baseline: the cells' column
              Row("baseline", "baseline: single model", (*SINGLE, *NO_SUBSETS, *ADAM),
                  budgets=_SMALL, cells=(_cgl_cell(74.68, baseline=True),)),
              Row("clilr", "CL-ILR: 3 heads sharing all but layer3", (*_CLILR, *ADAM),
                  budgets=_SMALL, cells=(_cgl_cell(76.61),)),
              Row("cgl", f"CGL ({_K} students, p={_P})", (*routed(_K), *cgl(_P), *SUBSETS,
                                                          *ADAM),
                  budgets=_SMALL, cells=(_cgl_cell(78.01),)),
              Row("no-routing", "w/o random routing (RR): independent networks",
                  (f"graph={{pattern: instances, heads: {_K}}}", *cgl(_P), *SUBSETS, *ADAM),
                  budgets=_SMALL, cells=(_cgl_cell(75.75),)),
              Row("no-subsets", "w/o sub-set data learning (SDL): all data for every student",
                  (*routed(_K), *cgl(_P), *NO_SUBSETS, *ADAM), budgets=_SMALL,
                  cells=(_cgl_cell(77.48),)),
              Row("no-subgroup", "w/o sub-group imitation (SGI): imitate all others (p=1)",
                  (*routed(_K), *cgl(1.0), *SUBSETS, *ADAM), budgets=_SMALL,
                  cells=(_cgl_cell(77.23),)))),
    Study("kdcl-table7", "KDCL: ensemble targets and invariant collaborative learning (ICL) "
          "against DML, ONE and OKDDip, per student",
          "paper 003 Table 7 (CIFAR-100, ResNet-32 and WRN-16-2 students; test error = 100 - "
          "the paper's accuracy, median of 5 runs, no std)",
          notes="Table 7's '2 distill 1' and '1 distill 2' rows (KD from a pre-trained teacher) "
                "are left out; OKDDip is not in Table 7 (no paper number), its ResNet column is "
                "the group leader (the last head). ICL: each student sees its own augmentation "
                "of the same images (data.views=per_head). Time on the small budget, one torch "
                "thread: one seed (13 runs, 13-30 s each) took about 5 minutes on an idle 2-core "
                "CPU, up to twice that on a busy one; --seeds 3: 15-30 minutes.",
          rows=(
              Row("vanilla-resnet", "vanilla ResNet", (*SINGLE, "model.name=cifar_resnet20",
                                                       *SHARED_VIEWS), budgets=_SMALL,
                  cells=(Cell(_RESNET, "0", _err(69.9), baseline=True),)),
              Row("vanilla-wrn", "vanilla WRN", (*SINGLE, "model.name=cifar_wrn16_2",
                                                 *SHARED_VIEWS), budgets=_SMALL,
                  cells=(Cell(_WRN, "0", _err(72.2), baseline=True),)),
              Row("dml", "DML", (*PEERS, "objective={name: dml}", *SHARED_VIEWS), budgets=_SMALL,
                  cells=_students(73.3, 74.8)),
              Row("one", "ONE (3 branches of layer3, best on hold-out)", _ONE, budgets=_SMALL,
                  cells=(Cell(_RESNET, "best", _err(73.6)),)),
              *(Row(f"kdcl-{target}{'-icl' * icl}", f"KDCL-{name}{' with ICL' * icl}",
                    kdcl(target, icl), budgets=_SMALL,
                    cells=_students(*(with_icl if icl else plain)))
                for target, name, plain, with_icl in _KDCL_ROWS for icl in (False, True)),
              Row("okddip", "OKDDip (3 peers + leader, leader reported)", _OKDDIP,
                  budgets=_SMALL, cells=(Cell(_RESNET, "last"),)))),
    Study("intra-table1", "intra-model collaboration: each of the four losses alone and the "
          "paper's two best combinations, one network", "paper 004 Table I (CIFAR-100, ResNet-18; "
          "test error %, a single run each, the lowest over all epochs)",
          notes=_INTRA_NOTES, rows=tuple(
              Row(key, label, (_intra_graph(views), _intra_objective(views, **weights)),
                  budgets=_SMALL, cells=(
                      Cell(_INTRA_HOLDOUT, "0", paper, baseline=not weights, epoch="holdout"),
                      Cell(_INTRA_LAST, "0", baseline=not weights)))
              for key, label, views, weights, paper in _INTRA_ROWS)),
)}


# ============================================================================ running

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
#: keys the runner sets itself; a user override of them would break the study's bookkeeping
RESERVED = {"name": "the study names its runs", "seed": "use --seeds",
            "run.dir": "use --dir", "run.name": "the study names its runs",
            "run.resume": "finished runs are skipped and others resumed automatically",
            "train.max_steps": "a study compares finished runs; use train.epochs"}
#: recipe keys that may differ between the settings of a run directory and a later call
_NOT_SETTINGS = ("run", "data.num_workers")


def get_study(name: str) -> Study:
    """The study called ``name``; UserError for an unknown one or one whose method is missing."""
    ready = [s for s in STUDIES.values() if s.needs is None]
    waiting = [s for s in STUDIES.values() if s.needs is not None]
    study = STUDIES.get(name)
    if study is None:
        raise UserError(f"unknown study '{name}'; valid: {', '.join(s.name for s in ready)} "
                        f"(not landed yet: {', '.join(s.name for s in waiting)})")
    if study.needs is not None:
        raise UserError(f"study '{name}' needs method {study.needs} which has not landed yet; "
                        f"studies that can run now: {', '.join(s.name for s in ready)}")
    return study


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise UserError(f"unknown budget '{name}'; valid: {', '.join(BUDGETS)}")
    return BUDGETS[name]


def study_directory(study: Study, budget: Budget, root: str | Path) -> Path:
    return Path(root) / f"{study.name}-{budget.name}"


def run_name(row: Row, seed: int) -> str:
    return f"{row.key}-seed{seed}"


def check_overrides(study: Study, budget: Budget, overrides: Sequence[str]) -> None:
    """Refuse user overrides that would change what the rows compare or how runs are named."""
    given = {".".join(path): value for path, value in parse_overrides(overrides)}
    row_keys = {".".join(path) for row in study.rows for path, _ in parse_overrides(row.overrides)}
    for key in given:
        if key in RESERVED:
            raise UserError(f"override '{key}' is set by the study runner ({RESERVED[key]})")
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in row_keys):
            raise UserError(f"override '{key}' would change what the rows of study "
                            f"'{study.name}' compare (their keys: {', '.join(sorted(row_keys))})")
    if budget.needs_source:
        source = given.get("data.source")
        if source is None or str(source).startswith("builtin:"):
            raise UserError(f"budget '{budget.name}' trains on {budget.dataset}: give "
                            "data.source=<a save_to_disk directory of cifar10, or the hub id "
                            "cifar10>; the built-in digits are the 'small' budget")


def recipe_for(study: Study, budget: Budget, row: Row, seed: int, study_dir: Path,
               overrides: Sequence[str] = ()) -> Recipe:
    """The strictly validated recipe of one run: budget base + budget + row + user overrides."""
    base = None
    if budget.base is not None:
        base = RECIPES / budget.base
        if not base.is_file():
            raise UserError(f"budget '{budget.name}' is based on {base}, which is missing "
                            "(run from a checkout of the repository)")
    runs = json.dumps(str(study_dir / "runs"))  # a YAML double-quoted string: any path is safe
    return load_recipe(base, [*budget.overrides, *row.overrides, "run.progress=false",
                              *overrides, f"name={study.name}-{row.key}", f"seed={seed}",
                              f"run.dir={runs}", f"run.name={run_name(row, seed)}",
                              "run.resume=auto"])


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _settings(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _flatten(tree).items()
            if not any(k == n or k.startswith(n + ".") for n in _NOT_SETTINGS)}


def run_state(recipe: Recipe) -> str:
    """``"finished"``, ``"partial"`` (resume it) or ``"new"``; UserError on other settings."""
    run_dir = engine.run_directory(recipe)
    saved_file = run_dir / "recipe.yaml"
    if not saved_file.is_file():
        return "new"
    saved, wanted = _settings(yaml.safe_load(saved_file.read_text())), _settings(
        recipe_to_dict(recipe))
    # a data/train key the run's recipe lacks was added to the recipe format since: it had its
    # default (graph and objective sections are open: a missing key there is simply unset)
    defaults = _settings(recipe_to_dict(Recipe()))
    saved = {**{k: v for k, v in defaults.items() if k not in saved
                and k.split(".")[0] in ("data", "train")}, **saved}
    changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"{run_dir} was trained with {k}={saved.get(k)!r} but this study asks "
                        f"for {k}={wanted.get(k)!r} ({len(changed)} setting(s) differ); use "
                        "another --dir, or delete that run directory to train it again")
    history = engine.history_of(run_dir)
    if (run_dir / "summary.json").is_file() and history \
            and history[-1]["epoch"] == recipe.train.epochs:
        return "finished"
    return "partial"


def code_version() -> dict[str, Any]:
    """``git rev-parse HEAD`` of the code, and whether the checkout has uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if head else None
    return {"git": head or "unknown (not a git checkout)", "dirty": bool(status)}


def canonical_command(study: str, seeds: int, budget: str, root: str | Path,
                      overrides: Sequence[str], threads: int | None) -> str:
    """The command line that runs this study again (every option spelled out)."""
    argv = ["collabsurgery", "reproduce", study, "--seeds", str(seeds), "--budget", budget,
            "--dir", str(root)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return shlex.join([*argv, *overrides])


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def run_study(study: str | Study, *, seeds: int | None = None, budget: str = "small",
              root: str | Path = "studies", overrides: Sequence[str] = (),
              max_runs: int | None = None, threads: int | None = None,
              command: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Train what is missing of ``study`` (resuming), then write its report; returns its dir.

    Args:
        study: a name from :data:`STUDIES`, or a :class:`Study`.
        seeds: runs per row (seeds ``0..seeds-1``); default: the budget's.
        budget: ``"small"`` (built-in digits, CPU-sized) or ``"full"`` (the paper's setting).
        root: the study directory is ``root/<study>-<budget>``.
        overrides: ``key=value`` for every run (not the keys the rows set).
        max_runs: train at most this many runs now (0: only measure costs and write the report).
        threads: CPU threads for torch; default 1 when there is no GPU (several times faster
            than 2 on a busy 2-core machine), else unchanged.
        command: recorded in the report; default: the equivalent ``collabsurgery`` command.
    """
    from accelerate import PartialState

    study = get_study(study) if isinstance(study, str) else study
    plan = get_budget(budget)
    seeds = plan.seeds if seeds is None else seeds
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if max_runs is not None and max_runs < 0:
        raise UserError(f"--max-runs must be >= 0, got {max_runs}")
    rows = study.rows_for(plan.name)
    if not rows:
        raise UserError(f"study '{study.name}' has no rows on budget '{plan.name}'; budgets: "
                        + ", ".join(b for b in BUDGETS if study.rows_for(b)))
    overrides = list(overrides)
    check_overrides(study, plan, overrides)
    study_dir = study_directory(study, plan, root)
    grid = [(row, seed, recipe_for(study, plan, row, seed, study_dir, overrides))
            for seed in range(seeds) for row in rows]  # seed-major: early reports cover all rows
    states = {run_name(row, seed): run_state(recipe) for row, seed, recipe in grid}

    main = PartialState().is_main_process
    if threads is None and not torch.cuda.is_available():
        threads = 1
    record = {"command": command or canonical_command(study.name, seeds, plan.name, root,
                                                      overrides, threads),
              **code_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads,
              "trained": [], "stopped": {}}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        done = sum(s == "finished" for s in states.values())
        log(f"study {study.name} ({plan.name} budget): {len(grid)} runs, {done} finished, "
            f"{sum(s == 'partial' for s in states.values())} to resume -> {study_dir}")
        if main:
            study_dir.mkdir(parents=True, exist_ok=True)
        _train_missing(grid, states, record, max_runs, study_dir / "timings.json", main, log)
    finally:
        torch.set_num_threads(before)
        if main and study_dir.is_dir():  # an interrupted call is recorded too
            record["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
            book_file = study_dir / "study.json"
            book = _read_json(book_file, {"study": study.name, "budget": plan.name,
                                          "invocations": []})
            book["invocations"].append(record)
            _write_json(book_file, book)
    if main:
        recipes = {row.key: [r for rr, _, r in grid if rr is row] for row in rows}
        measure_costs(study_dir, [(row, recipes[row.key]) for row in rows], log)
        log(f"report: {write_report(study, plan, study_dir, rows, seeds, recipes)}")
    if record["stopped"]:
        raise TrainingStopped(f"{len(record['stopped'])} run(s) stopped ("
                              + "; ".join(f"{k}: {v}" for k, v in record["stopped"].items())
                              + f"); the report in {study_dir} covers the finished runs")
    return study_dir


def _train_missing(grid: list[tuple[Row, int, Recipe]], states: dict[str, str],
                   record: dict[str, Any], max_runs: int | None, timings_file: Path, main: bool,
                   log: Callable[[str], None]) -> None:
    """Train (or resume) every run that is not finished, at most ``max_runs`` of them.

    A run that stops (non-finite loss) is recorded and the others go on.
    """
    for i, (row, seed, recipe) in enumerate(grid, 1):
        name = run_name(row, seed)
        if states[name] == "finished":
            continue
        if max_runs is not None and len(record["trained"]) + len(record["stopped"]) >= max_runs:
            log(f"stopping after {max_runs} run(s) (--max-runs); run again to continue")
            return
        log(f"[{i}/{len(grid)}] {'resuming' if states[name] == 'partial' else 'training'} "
            f"{name}: {row.label}")
        start = time.perf_counter()
        try:
            engine.train(recipe)
        except TrainingStopped as err:
            log(f"{name} stopped: {err}")
            record["stopped"][name] = str(err)
            continue
        finally:
            if main:
                timings = _read_json(timings_file, {})
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
                _write_json(timings_file, timings)
        record["trained"].append(name)


# ============================================================================ the report

METRICS = (("head0", "head0_test_acc", "head 0"),
           ("best", "best_head_test_acc", "best head on hold-out"),
           ("ensemble", "ensemble_test_acc", "ensemble"))


# ---------------------------------------------------------------------------- costs

def _cost_key(run_dir: Path, recipe: Recipe) -> str | None:
    """What a cost measurement depends on (rows with the same graph share one); None: no run."""
    if not (run_dir / "graph.json").is_file():
        return None
    cfg = config_from_json((run_dir / "graph.json").read_text())
    return json.dumps({"pattern": cfg.kind, "args": cfg.args,
                       "image_size": recipe.data.image_size, "batch_size": recipe.train.batch_size,
                       "precision": recipe.train.mixed_precision,
                       "channels_last": recipe.train.channels_last}, sort_keys=True)


def _row_cost_key(recipes: Sequence[Recipe]) -> str | None:
    keys = [_cost_key(engine.run_directory(r), r) for r in recipes]
    return next((k for k in keys if k is not None), None)


def measure_costs(study_dir: Path, rows: Sequence[tuple[Row, Sequence[Recipe]]],
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bench every row's training graph once (it needs one started run for the graph file)."""
    import torch

    from .bench import BenchConfig, run_bench

    path = study_dir / "costs.json"
    costs = _read_json(path, {})
    for row, recipes in rows:
        key = _row_cost_key(recipes)
        if key is not None and key in costs and "params_ratio" not in costs[key]:
            costs[key]["params_ratio"] = params_ratio(json.loads(key))  # measured before it was
            _write_json(path, costs)
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
        _write_json(path, costs)
    return costs


def params_ratio(key: dict[str, Any]) -> float:
    """Parameters of the training graph of a cost key over the plain model's (head 0's
    backbone): every copy of a module counted once, shared modules once."""
    import torch

    from .backbones import create
    from .graphs import GraphConfig, rebuild

    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the RNG be
        net = rebuild(GraphConfig(key["pattern"], key["args"]))
        plain = create(net.head_spec(0))
    return sum(p.numel() for p in net.parameters()) / sum(p.numel() for p in plain.parameters())


# ---------------------------------------------------------------------------- numbers

def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch metrics (``metrics.jsonl``)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def collect(study_dir: Path, rows: Sequence[Row], seeds: int,
            recipes: dict[str, Sequence[Recipe]], extras: Sequence[Extra] = ()
            ) -> list[dict[str, Any]]:
    """Per row: every finished run's errors (from summary.json), and the ``extras`` numbers
    (None in a run without one), and their mean and std (over the runs that have them)."""
    timings = _read_json(study_dir / "timings.json", {})
    costs = _read_json(study_dir / "costs.json", {})
    out = []
    for row in rows:
        runs = []
        for seed in range(seeds):
            name = run_name(row, seed)
            summary_file = study_dir / "runs" / name / "summary.json"
            if not summary_file.is_file():
                continue
            s = json.loads(summary_file.read_text())
            run = {"run": name, "seed": seed, "epoch": s["final"]["epoch"],
                   "test_examples": s["final"]["test"]["examples"], "best_head": s["best_head"],
                   "wall_s": timings.get(name)}
            run.update({f"{m}_err": 100 * (1 - s[field]) for m, field, _ in METRICS})
            if row.cells:
                history = _read_history(summary_file.parent) if any(
                    c.epoch == "holdout" for c in row.cells) else []
                run["columns"] = {c.column: cell_error(c, s, history) for c in row.cells}
            run.update({e.key: summary_value(s, e.path) for e in extras})
            runs.append(run)
        entry: dict[str, Any] = {"key": row.key, "label": row.label, "series": row.series,
                                 "x": row.x, "paper": row.paper, "runs": runs,
                                 "cost": costs.get(_row_cost_key(recipes[row.key]) or "")}
        for m, _, _ in METRICS:
            entry[f"{m}_err"] = _mean_std([r[f"{m}_err"] for r in runs])
        for e in extras:
            entry[e.key] = _mean_std([r[e.key] for r in runs if r[e.key] is not None])
        if row.cells:
            entry["columns"] = {c.column: {"head": c.head, "paper": c.paper, "err": _mean_std(
                [r["columns"][c.column] for r in runs])} for c in row.cells}
        out.append(entry)
    _column_differences(rows, out)
    return out


def _column_differences(rows: Sequence[Row], results: list[dict[str, Any]]) -> None:
    """Per column, each row minus the column's baseline row: the mean over paired seeds (the
    same seed index finished in both) and the number of pairs; and the paper's difference."""
    baselines = {c.column: r for row, r in zip(rows, results) for c in row.cells if c.baseline}
    for r in results:
        for column, cell in r.get("columns", {}).items():
            base = baselines.get(column)
            if base is None or base is r:
                continue
            theirs = {run["seed"]: run["columns"][column] for run in base["runs"]}
            diffs = [run["columns"][column] - theirs[run["seed"]] for run in r["runs"]
                     if run["seed"] in theirs]
            papers = cell["paper"], base["columns"][column]["paper"]
            cell.update(baseline=base["key"], pairs=len(diffs),
                        diff=statistics.fmean(diffs) if diffs else None,
                        paper_diff=None if None in papers else papers[0] - papers[1])


# ---------------------------------------------------------------------------- writing

def _pm(stat: dict[str, float | None], digits: int = 2) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}"
                                           if stat["std"] is not None else "")


def _ratio(cost: dict | None, key: str) -> str:
    return "—" if not cost or cost.get(key) is None else f"{cost[key]:.2f}"


def _settings_line(recipe: Recipe, plan: Budget, results: list[dict], per_row: bool = False
                   ) -> str:
    r, d, t = recipe, recipe.data, recipe.train
    examples = next((run["test_examples"] for row in results for run in row["runs"]), None)
    test = f", {examples} test examples" if examples else ""
    train = f"{d.max_train_examples} training examples" if d.max_train_examples \
        else "all training examples"
    model = "each row's networks (Setups, below)" if per_row else f"`{r.model.name}`"
    objective = "" if per_row else f"; objective `{r.objective.name}`" + "".join(
        f", {k}={v}" for k, v in sorted(r.objective.args.items()))
    return (f"Budget **{plan.name}**: {plan.dataset}, data.source `{d.source}`, {train}{test}, "
            f"{model} at {d.image_size} px, {t.epochs} epochs, batch {t.batch_size}, "
            f"{'Adam' if t.optimizer == 'adam' else 'SGD'} lr {t.lr:g} ({t.schedule}), "
            f"weight decay {t.weight_decay:g}, "
            f"precision {t.mixed_precision}{objective}.")


def write_report(study: Study, plan: Budget, study_dir: Path, rows: Sequence[Row],
                 seeds: int, recipes: dict[str, Sequence[Recipe]]) -> Path:
    """``results.json``, ``report.md`` and the plots of a study, from its runs' files."""
    results = collect(study_dir, rows, seeds, recipes, study.extras)
    book = _read_json(study_dir / "study.json", {"invocations": []})
    _write_json(study_dir / "results.json", {"study": study.name, "budget": plan.name,
                                             "seeds": seeds, "rows": results})
    plots = [plot_bars(study, plan, results, study_dir / "errors.png")]
    if study.x_label:
        plots.append(plot_curves(study, plan.name, results, study_dir / "curves.png"))
    plots = [p for p in plots if p is not None]

    done = sum(len(r["runs"]) for r in results)
    total = seeds * len(rows)
    base = next((r for r in results if r["key"] == study.baseline), None)
    per_student = any(row.cells for row in rows)
    lines = [f"# {study.name}: {study.title}", "",
             _settings_line(recipes[rows[0].key][0], plan, results, per_student)
             + f" Why: {plan.why}", "",
             f"Paper numbers: {study.source}." + (
                 " On this budget the data and the network differ from the paper's: compare "
                 "orderings and differences, not absolute errors." if plan.needs_source is False
                 else ""), ""]
    lines += [study.notes, ""] if study.notes else []
    lines += [f"Runs finished: {done} of {total} ({seeds} seed(s) x {len(rows)} rows)"
              + ("" if done == total else " — **incomplete**: run the same command again to "
                                          "continue") + ".", ""]
    if per_student:
        lines += _student_lines(rows, results, seeds)
    lines += [f"## {'Every head: t' if per_student else 'T'}est error (%), mean ± std over seeds",
              ""]
    head = ["setup", "runs", "head 0"] + ([] if per_student else ["paper"])
    if base:
        head += [f"head 0 − {base['key']}", f"paper − {base['key']}"]
    head += ["best head on hold-out", "ensemble", *(e.label for e in study.extras), "time ×",
             "memory ×", "FLOPs ×", "params ×"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        paper = "—" if r["paper"] is None else f"{r['paper'][0]:.2f} ± {r['paper'][1]:.2f}"
        cells = [r["label"], f"{len(r['runs'])}/{seeds}", _pm(r["head0_err"])]
        cells += [] if per_student else [paper]
        if base:
            ours = r["head0_err"]["mean"], base["head0_err"]["mean"]
            cells.append("—" if None in ours else f"{ours[0] - ours[1]:+.2f}")
            theirs = r["paper"], base["paper"]
            cells.append("—" if None in theirs else f"{theirs[0][0] - theirs[1][0]:+.2f}")
        cells += [_pm(r["best_err"]), _pm(r["ensemble_err"])]
        cells += [_pm(r[e.key], e.digits) for e in study.extras]
        cells += [_ratio(r["cost"], k) for k in ("time_ratio", "mem_ratio", "flop_ratio",
                                                 "params_ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "head 0: the first head" + ("" if per_student else ", as the paper evaluates")
              + "; best head: the head with the best hold-out accuracy, its test error; "
              "ensemble: the mean of all heads' logits. One head means all three are the same "
              "model." + "".join(f" {e.about}." for e in study.extras if e.about), ""]
    lines += _noise_lines(results) + _cost_lines(results)
    if per_student:
        lines += ["## Setups", "", "Each row's overrides on top of the budget's:", ""]
        lines += [f"- `{row.key}`: `{shlex.join(row.overrides)}`" for row in rows] + [""]
    lines += ["## Plots", ""] + ([f"![{p.stem}]({p.name})" for p in plots] or
                                 ["(none yet: no finished run)"]) + [""]
    lines += _run_lines(results) + _provenance_lines(book)
    path = study_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _student_lines(rows: Sequence[Row], results: list[dict], seeds: int) -> list[str]:
    """The per-student table: per column each row's error, the paper's, and the differences
    to the column's baseline row; then which head each cell reads."""
    columns = list(dict.fromkeys(c.column for row in rows for c in row.cells))
    baselines = {c.column: row.key for row in rows for c in row.cells if c.baseline}
    head = ["setup", "runs"]
    for col in columns:
        head += [col, "paper"]
        head += [f"− {baselines[col]} (pairs)", f"paper − {baselines[col]}"] \
            if col in baselines else []
    lines = ["## Test error (%) per student, mean ± std over seeds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["label"], f"{len(r['runs'])}/{seeds}"]
        for col in columns:
            c = r.get("columns", {}).get(col)
            width = 4 if col in baselines else 2
            if c is None:
                cells += [""] * width
                continue
            cells += [_pm(c["err"]), "—" if c["paper"] is None else f"{c['paper']:.2f}"]
            if "pairs" in c:
                cells += ["—" if c["diff"] is None else f"{c['diff']:+.2f} ({c['pairs']})",
                          "—" if c["paper_diff"] is None else f"{c['paper_diff']:+.2f}"]
            else:
                cells += ["baseline", ""][:width - 2]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each cell is the test error of one head of the row's runs:"]
    for col in columns:
        heads: dict[str, list[str]] = {}
        for row in rows:
            for c in row.cells:
                if c.column == col:
                    heads.setdefault(c.head, []).append(row.key)
        names = {"best": "the best head on hold-out", "last": "the last head"}
        lines.append(f"- {col}: " + "; ".join(f"{names.get(h, f'head {h}')} of {', '.join(keys)}"
                                              for h, keys in heads.items()) + ".")
    return lines + ["", "− row (pairs): the mean over seeds of this row's error minus that "
                    "row's on the same seed, over the seeds finished in both (their number in "
                    "brackets); paper −: the same difference of the paper's numbers; —: not in "
                    "the paper, or no finished pair; empty: the row has no such student.", ""]


def _noise_lines(results: list[dict]) -> list[str]:
    stds = [r["head0_err"]["std"] for r in results if r["head0_err"]["std"] is not None]
    examples = next((run["test_examples"] for r in results for run in r["runs"]), None)
    if not stds:
        return ["Seed noise: needs at least two finished seeds of a row.", ""]
    one = f"; one test example is {100 / examples:.2f} points" if examples else ""
    return [f"Seed noise: the std over seeds of head-0 test error is {min(stds):.2f} to "
            f"{max(stds):.2f} points across rows (median {statistics.median(stds):.2f}){one}. "
            "A difference between two rows well below their stds is not resolved by these "
            "seeds.", ""]


def _cost_lines(results: list[dict]) -> list[str]:
    cost = next((r["cost"] for r in results if r["cost"]), None)
    if cost is None:
        return []
    return ["time ×, memory ×: one training step (forward + backward) of the row's training "
            "graph over the plain model, on the study's image size and batch, measured once per "
            f"graph by `collabsurgery.bench` (median of {cost['repeats']} repeats after "
            f"{cost['warmup']} warm-up, {cost['precision']}, execution `{cost['mode']}`) on "
            f"{cost['device']}; clock: {cost['clock']}; memory: {cost['mem_method']}. "
            "FLOPs ×: forward + backward FLOPs. params ×: the training graph's parameters "
            "(every copy of a module once) over the plain model's.", ""]


def _run_lines(results: list[dict]) -> list[str]:
    lines = ["## Runs", "", "| run | epochs | head 0 | best head (index) | ensemble | "
             "wall s (this machine) |", "|---|---|---|---|---|---|"]
    walls = []
    for r in results:
        for run in r["runs"]:
            wall = run["wall_s"]
            walls += [wall] if wall is not None else []
            lines.append(f"| {run['run']} | {run['epoch']} | {run['head0_err']:.2f} | "
                         f"{run['best_err']:.2f} ({run['best_head']}) | "
                         f"{run['ensemble_err']:.2f} | "
                         + ("—" if wall is None else f"{wall:.0f}") + " |")
    if walls:
        lines += ["", f"Training wall time: {sum(walls) / 60:.1f} min for {len(walls)} runs "
                  f"(mean {statistics.fmean(walls) / 60:.2f} min a run)."]
    return lines + [""]


def _provenance_lines(book: dict) -> list[str]:
    lines = ["## Provenance", "", "Each call that worked on this study:", ""]
    for inv in book["invocations"]:
        dirty = " **plus uncommitted changes**" if inv["dirty"] else ""
        threads = f", torch threads {inv['threads']}" if inv.get("threads") else ""
        trained = ", ".join(inv["trained"]) or "none"
        stopped = "".join(f"; **stopped** {k}: {v}" for k, v in inv.get("stopped", {}).items())
        lines += [f"- {inv['started']}: `{inv['command']}` on code `{inv['git']}`{dirty}"
                  f"{threads}; trained: {trained}{stopped}"]
    return lines


def plot_bars(study: Study, plan: Budget, results: list[dict], path: Path) -> Path | None:
    """Test error per row: head 0, best head and ensemble, error bars = std over seeds."""
    shown = [r for r in results if r["runs"]]
    if not shown:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shown) + 2), 4.5))
    width = 0.8 / len(METRICS)
    for j, (m, _, label) in enumerate(METRICS):
        xs = [i + (j - 1) * width for i in range(len(shown))]
        ax.bar(xs, [r[f"{m}_err"]["mean"] for r in shown], width,
               yerr=[r[f"{m}_err"]["std"] or 0 for r in shown], capsize=3, label=label)
    if plan.needs_source:  # same data as the paper: its head-0 numbers are comparable
        paper = [(i, r["paper"]) for i, r in enumerate(shown) if r["paper"]]
        ax.scatter([i - width for i, _ in paper], [p[0] for _, p in paper], marker="x",
                   color="black", zorder=3, label="paper (head 0)")
    ax.set_xticks(range(len(shown)), [r["key"] for r in shown], rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="test error (%)", title=f"{study.name} ({plan.name} budget)")
    return save_figure(fig, ax, path, grid_axis="y")


def plot_curves(study: Study, budget: str, results: list[dict], path: Path) -> Path | None:
    """Test error against the study's x (e.g. label noise), one curve per setup."""
    series: dict[str, list[dict]] = {}
    for r in results:
        if r["runs"] and r["series"] is not None:
            series.setdefault(r["series"], []).append(r)
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [r["x"] for rows in series.values() for r in rows]
    dodge = 0.01 * ((max(xs) - min(xs)) or 1)  # keep the error bars of the curves apart
    for i, (name, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r["x"])
        color, shift = f"C{i}", dodge * (i - (len(series) - 1) / 2)
        one_head = all(run["ensemble_err"] == run["head0_err"] and run["best_head"] == 0
                       for r in rows for run in r["runs"])
        for m, style in (("head0", "-"), ("ensemble", ":"))[:1 if one_head else 2]:
            ax.errorbar([r["x"] + shift for r in rows], [r[f"{m}_err"]["mean"] for r in rows],
                        yerr=[r[f"{m}_err"]["std"] or 0 for r in rows], fmt="o" + style,
                        color=color, capsize=3, ms=4,
                        label=f"{name} ({'head 0' if m == 'head0' else 'ensemble'})")
    ax.set(xlabel=study.x_label, ylabel="test error (%)", title=f"{study.name} ({budget} budget)")
    return save_figure(fig, ax, path, legend_size=7)
