"""The catalog: the budgets and every paper study, each one entry of :data:`STUDIES`.

A study is plain data (:mod:`.spec`): a budget's base recipe plus, per row, a short list of
``dotted.key=value`` overrides (:mod:`.blocks`), put through
:func:`~collabsurgery.config.recipe.load_recipe`, so every run is strictly validated. The paper numbers
beside ours are the papers' (test error %, mean and std); ours are only ever read from the runs'
files. Adding a method's study is adding one :class:`Study` to :data:`STUDIES`: the runner, the
statistics and the report need nothing more; text that only concerns that study goes in its
``notes``.

How the small budget was chosen, and what it cannot show: the package docstring
(:mod:`collabsurgery.studies`).
"""
from __future__ import annotations

from collabsurgery.studies.blocks import (ADAM, HIER4, LABEL_SMOOTHING, NO_SUBSETS, PEERS,
                                          SHARED_VIEWS, SIMPLE2, SINGLE, SUBSETS, cgl, instances,
                                          kdcl, routed, shared)
from collabsurgery.studies.spec import Budget, Cell, Extra, Row, Study

__all__ = ["BUDGETS", "DIVERSITY", "STUDIES", "catalog"]

# ============================================================================ budgets

BUDGETS = {
    "small": Budget(
        "small", None,
        ("model.name=cifar_resnet20", "data.source=builtin:digits-lowres", "data.image_size=12",
         "data.augment=true", "data.hflip=false", "data.label_noise=0.0",
         "data.max_train_examples=null", "train.epochs=30", "train.batch_size=64",
         "train.lr=0.1", "train.momentum=0.9", "train.nesterov=true",
         "train.weight_decay=5.0e-4", "train.schedule=cosine", "train.warmup_epochs=1",
         "train.mixed_precision=no", "run.checkpoint_every=0", "run.keep=1"),
        seeds=5, dataset="scikit-learn handwritten digits at 4x4 (builtin:digits-lowres: built "
                         "in, real data; 630 training, 70 hold-out and 1,097 test images)",
        why="an unsaturated stand-in for the papers' CIFAR-10 setting that 2 CPU cores can run "
            "with 5 seeds: the digits area-downsampled to 4x4 (upsampled to 12 px) with 63 "
            "training images per class leave a single ResNet-20 at 6.0 ± 0.8 % test error "
            "(5 seeds, 30 epochs), near a ResNet-32's 6.66 % on CIFAR-10, on 1,097 "
            "test images (one image is 0.09 points), so effects of the papers' size (0.5-0.8 "
            "points) are larger than one image and can be resolved by paired seeds; one torch "
            "thread; ResNet-20 keeps the three stages and split points of ResNet-32. "
            "What it cannot show: effects that need many images or long training (the papers "
            "train 200 epochs on 50,000 images), or natural-image features. Each run's wall "
            "time is in the Runs table."),
    # paper 000's CIFAR-10 setting (supplement, section 2), from the shipped ResNet-32 recipe
    "full": Budget(
        "full", "cifar10-resnet32-clilr-hier4.yaml", ("run.keep=1",), seeds=5,
        dataset="CIFAR-10", needs_source=True,
        why="close to paper 000's CIFAR-10 setting (its supplement, section 2), from the shipped "
            "recipe recipes/cifar10-resnet32-clilr-hier4.yaml, where it differs: 10% of the "
            "training images are held out to choose a head (the paper trains on all 50,000), "
            "and it trains in bf16 autocast (the paper in fp32)."),
}


# ============================================================================ shared parts

#: paper 002's diversity of the students, as the engine records it on the test split
DIVERSITY = Extra("diversity", "final.test.diversity", "diversity",
                  "diversity: the mean over test examples and over pairs of heads of the L2 "
                  "distance between their probability vectors (paper 002, Table 6 and Fig. 4; "
                  "— for one head)", digits=3)


def catalog(*studies: Study) -> dict[str, Study]:
    """Studies by name; two studies of one name are an error, never a silent overwrite."""
    names = [s.name for s in studies]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two studies are called {name!r}")
    return {s.name: s for s in studies}


# ============================================================================ the studies

_T1 = "paper 000 Table 1 (CIFAR-10, ResNet-32, 5 runs)"
#: paper 000 evaluates the first head, as the report's head-0 column does
_HEAD0 = "Head 0 is the head paper 000 evaluates."
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
# PCL: 3 peers of layer3 on their own views, the same ramp-up share; its temporal means' EMA
# decay 0.9 averages ~10 steps, about one epoch of the small budget, where the paper's 0.999
# averages ~1,000 steps, about 3 of its 300 epochs
_PCL = ("model.name=cifar_resnet20",
        "graph={pattern: tree, heads: 3, split: [layer2, global_pool], branches: [3, 1], "
        "views: true}", "objective={name: pcl, rampup_epochs: 4}", "data.views=per_head",
        "train.ema_decay=0.9", "train.ema_warmup=true", "train.ema_select=true")

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


#: BYOT (Zhang et al., ICCV 2019) beside the intra-model rows: one network, shallow classifiers
#: at its stages taught by its own classifier; the reference code's alpha, lambda and T
_BYOT = ("graph={pattern: tree, heads: 1, split: [layer1, layer2, layer3]}",
         "objective={name: byot, alpha: 0.1, hint_weight: 1.0e-6, temperature: 3.0, "
         "exits: [layer1, layer2], deepest: layer3}")
_BYOT_PAPER = 21.36  # BYOT's Table 1, CIFAR-100 ResNet-18, the deepest classifier: 78.64%

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
    "differences to the baseline. The 'baseline (2x)' column (twice the filters) is left out. "
    "BYOT (Zhang et al., ICCV 2019; its paper number is its own Table 1's deepest classifier, "
    "78.64% on CIFAR-100 ResNet-18) runs the network without the dropouts, with shallow "
    "classifiers after layer1 and layer2 taught by its own classifier and layer3 feature "
    "(alpha=0.1, lambda=1e-6, T=3, the reference code's); it exports the plain network.")


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

STUDIES: dict[str, Study] = catalog(
    Study("clilr-table1", "CL-ILR: training graphs against individual learning", _T1,
          baseline="single", notes=_HEAD0, rows=(
              Row("single", "single instance", SINGLE, (6.66, 0.21)),
              Row("label-smoothing", "label smoothing (0.05)", LABEL_SMOOTHING, (6.83, 0.14)),
              Row("instances2", "2 instances", instances(2), (6.19, 0.17)),
              Row("instances4", "4 instances", instances(4), (6.16, 0.17)),
              Row("simple2", "2 heads, simple ILR sharing (layer1)", SIMPLE2, (5.97, 0.07)),
              Row("hier4", "4 heads, hierarchical ILR sharing (layer1, layer2)", HIER4,
                  (5.86, 0.13)))),
    Study("clilr-rescaling", "CL-ILR: 4 heads sharing up to layer1, gradient rescaling",
          "paper 000 Table 3 (CIFAR-10, ResNet-32)", baseline="none", notes=_HEAD0, rows=(
              Row("none", "no scaling", shared(4, "layer1", rescale="none"), (6.04, 0.17)),
              Row("loss", "loss scaling (1/4)", shared(4, "layer1", rescale="loss"),
                  (6.09, 0.24)),
              Row("backprop", "backprop rescaling", shared(4, "layer1", rescale="backprop"),
                  (5.82, 0.08)))),
    Study("clilr-noise", "CL-ILR: test error against label noise",
          "paper 000 Figure 3 (CIFAR-10, ResNet-32; no table numbers)",
          notes=_HEAD0 + " Each collaborative row is compared with the single model at the same "
          "noise level (its baseline), seed by seed.",
          x_label="label noise (fraction of training labels redrawn every epoch)", rows=tuple(
              Row(f"{key}-noise{level:g}", f"{label}, noise {level:g}",
                  (*overrides, f"data.label_noise={level}"), series=label, x=level,
                  budgets=budgets, baseline=None if key == "single" else f"single-noise{level:g}")
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
          "against DML, ONE, OKDDip and PCL, per student",
          "paper 003 Table 7 (CIFAR-100, ResNet-32 and WRN-16-2 students; test error = 100 - "
          "the paper's accuracy, median of 5 runs, no std)",
          notes="Table 7's '2 distill 1' and '1 distill 2' rows (KD from a pre-trained teacher) "
                "are left out; OKDDip is not in Table 7 (no paper number), its ResNet column is "
                "the group leader (the last head). PCL is not in Table 7 either: its paper "
                "number is its own (Wu & Gong, AAAI 2021, CIFAR-100 ResNet-32: 74.14%) and its "
                "cell is the temporal mean (EMA weights) of the peer best on hold-out, the "
                "model PCL deploys. ICL: each student sees its own augmentation "
                "of the same images (data.views=per_head). Time on the small budget, one torch "
                "thread: one seed (14 runs, 13-30 s each) took about 5 minutes on an idle 2-core "
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
                  budgets=_SMALL, cells=(Cell(_RESNET, "last"),)),
              Row("pcl", "PCL (3 peers of layer3, own views; EMA of the best on hold-out)",
                  _PCL, budgets=_SMALL,
                  cells=(Cell(_RESNET, "best", _err(74.14), weights="ema"),)))),
    Study("intra-table1", "intra-model collaboration: each of the four losses alone and the "
          "paper's two best combinations, one network", "paper 004 Table I (CIFAR-100, ResNet-18; "
          "test error %, a single run each, the lowest over all epochs)",
          notes=_INTRA_NOTES, rows=tuple(
              Row(key, label, (_intra_graph(views), _intra_objective(views, **weights)),
                  budgets=_SMALL, cells=(
                      Cell(_INTRA_HOLDOUT, "0", paper, baseline=not weights, epoch="holdout"),
                      Cell(_INTRA_LAST, "0", baseline=not weights)))
              for key, label, views, weights, paper in _INTRA_ROWS) + (
              Row("byot", "BYOT self distillation (exits after layer1, layer2; no dropout)",
                  _BYOT, budgets=_SMALL, cells=(
                      Cell(_INTRA_HOLDOUT, "0", _BYOT_PAPER, epoch="holdout"),
                      Cell(_INTRA_LAST, "0"))),)),
)


