"""Paper studies: a table as a grid of recipes over seeds, resumable, with a computed report.

    collabsurgery reproduce clilr-table1 --seeds 5 --budget small
    collabsurgery reproduce --all                  # every landed study, then studies/index.md
    python tools/reproduce.py clilr-noise --budget full data.source=/data/cifar10

One module a job:

- :mod:`.spec`: what a study is (:class:`Study`, :class:`Row`, :class:`Cell`, :class:`Extra`,
  :class:`Budget`), checked when built;
- :mod:`.blocks` and :mod:`.catalog`: the recipe fragments rows are made of, the budgets and
  every study, one entry of :data:`STUDIES` each (adding a method's study is adding one entry);
- :mod:`.runner`: rows x seeds as strictly validated recipes, finished runs skipped, interrupted
  ones resumed; :func:`run_all` runs every landed study and writes an index page;
- :mod:`.store`: the study directory's layout and JSON files;
- :mod:`.results`: the numbers, read from the runs' ``summary.json`` (and ``metrics.jsonl``) only;
- :mod:`.stats`: paired differences to the baseline row over seeds, their Student t interval
  and a verdict against the paper's difference;
- :mod:`.costs`: time / memory / FLOP / parameter ratios of each row's training graph;
- :mod:`.report` and :mod:`.plots`: ``results.json``, ``report.md``, the plots and the index.

**The small budget** (2 shared CPU cores, ``--seeds 5``) must leave room for the papers'
effects: the earlier one (the 8x8 digits, 1,294 training and 359 test images) trained a single
ResNet-20 to about 1 % test error, where one test image is 0.28 points and the seed std (about
1 point) exceeded every effect paper 000 reports (0.5-0.8 points). Measured alternatives, single
ResNet-20 at 12 px, test error over 3 seeds: 700 training images of the 8x8 digits, 1.7 %;
200 of them, 4.9 ± 0.7 %; the digits at 5x5 with 300, 5.1 ± 0.5 %; the digits at 4x4 with
630, 7.1 ± 1.2 % in 15 epochs and 6.4 ± 0.8 % in 30. The budget is the last:
``builtin:digits-lowres`` (each digit area-downsampled to 4x4: a harder variant of the same real
images, as CIFAR's 32 px is a low resolution for its objects), 630 training, 70 hold-out and
1,097 test images (one image is 0.09 points), 30 epochs. Its single model: **6.03 ± 0.79 % test
error over 5 seeds** (paper 000's ResNet-32 on CIFAR-10: 6.66 ± 0.21), 13-22 s a run on one
thread of a busy CPU::

    collabsurgery reproduce clilr-table1 --seeds 5        # the row "single" is that model

Rows share seeds (the same hold-out split, data order, augmentation and trunk initialisation),
so paired differences cancel much of the seed noise. A fair stand-in for the paper's setting:
same architecture family and stage layout, the same optimiser and schedule shape, an error level
like the paper's. What it cannot show: effects that need many images or long training (the
paper trains 200 epochs on 50,000 images), natural-image features, or GPU-scale batches.
"""
from __future__ import annotations

from collabsurgery.studies.blocks import (ADAM, CONSENSUS, HIER4, LABEL_SMOOTHING, NO_SUBSETS,
                                          PEERS, RESNET20_BLOCKS, SHARED_VIEWS, SIMPLE2, SINGLE,
                                          SUBSETS, cgl, instances, kdcl, routed, shared)
from collabsurgery.studies.catalog import BUDGETS, DIVERSITY, STUDIES, catalog
from collabsurgery.studies.costs import measure_costs, params_ratio, row_cost_key
from collabsurgery.studies.plots import plot_bars, plot_curves
from collabsurgery.studies.report import verdict_summary, write_index, write_report
from collabsurgery.studies.results import (METRICS, cell_error, collect, head_error,
                                           holdout_epoch_error, summary_value)
from collabsurgery.studies.runner import (Plan, canonical_command, check_overrides, code_version,
                                          get_budget, get_study, landed_studies, plan_study,
                                          recipe_for, run_all, run_state, run_study)
from collabsurgery.studies.spec import Budget, Cell, Extra, Row, Study
from collabsurgery.studies.stats import paired_difference, t_interval, verdict, verdicts
from collabsurgery.studies.store import run_name, study_directory

__all__ = ["ADAM", "BUDGETS", "CONSENSUS", "DIVERSITY", "HIER4", "LABEL_SMOOTHING", "METRICS",
           "NO_SUBSETS", "PEERS", "RESNET20_BLOCKS", "SHARED_VIEWS", "SIMPLE2", "SINGLE", "STUDIES",
           "SUBSETS", "Budget", "Cell", "Extra", "Plan", "Row", "Study", "canonical_command",
           "catalog", "cell_error", "cgl", "check_overrides", "code_version", "collect",
           "get_budget", "get_study", "head_error", "holdout_epoch_error", "instances", "kdcl",
           "landed_studies", "measure_costs", "paired_difference", "params_ratio", "plan_study",
           "plot_bars", "plot_curves", "recipe_for", "routed", "row_cost_key", "run_all",
           "run_name", "run_state", "run_study", "shared", "study_directory", "summary_value",
           "t_interval", "verdict", "verdict_summary", "verdicts", "write_index", "write_report"]
