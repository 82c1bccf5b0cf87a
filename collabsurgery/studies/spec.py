"""What a study is made of: a budget, rows of recipe overrides, per-student cells and extras.

Plain frozen dataclasses, checked when built, so that a mistake in a catalog entry fails at
import, not after an hour of training.
"""
from __future__ import annotations

from dataclasses import dataclass

#: the keys results.json already gives each row and each run (an Extra may not reuse them)
RESULT_KEYS = {"key", "label", "series", "x", "paper", "runs", "cost", "columns", "difference",
               "run", "seed", "epoch", "test_examples", "best_head", "wall_s", "head0_err",
               "best_err", "ensemble_err"}


@dataclass(frozen=True)
class Cell:
    """A row's entry in one column of a per-student table: the test error of one head."""

    column: str                 # the column's label, the same in every row
    head: str                   # "0", "1", ...: that head; "best": best on hold-out; "last"
    paper: float | None = None  # the paper's test error % there (None: not in the paper)
    baseline: bool = False      # differences in this column are taken against this row
    epoch: str = "last"         # "last": the last epoch's test error; "holdout": the test error
    #                             at the epoch of the highest hold-out accuracy
    weights: str = "live"       # "ema": the EMA weights' (a run with train.ema_decay, e.g. PCL)


@dataclass(frozen=True)
class Extra:
    """A number of every finished run's ``summary.json`` that a study shows per row: one more
    column of the per-row table (mean ± std over seeds; — where no run has it)."""

    key: str          # its key in results.json (per row and per run)
    path: str         # where it is in summary.json, dotted: "final.test.diversity"
    label: str        # the column's header
    about: str = ""   # one sentence under the table: what it is
    digits: int = 2   # decimals shown


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
    baseline: str | None = None  # the row head 0 is compared with (default: the study's)


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
    notes: str = ""              # for the report: setting, what was left out, time per seed, ...
    extras: tuple[Extra, ...] = ()  # more numbers of the runs' summary.json, a column each

    def __post_init__(self) -> None:
        keys = [row.key for row in self.rows]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"study {self.name}: row key {duplicated[0]!r} is used twice")
        for row in self.rows:
            if row.baseline is not None and row.baseline not in keys:
                raise ValueError(f"study {self.name}: row {row.key!r} is compared with "
                                 f"{row.baseline!r}, which is not a row")
        if self.baseline is not None and self.rows and self.baseline not in keys:
            raise ValueError(f"study {self.name}: baseline {self.baseline!r} is not a row; "
                             f"rows: {', '.join(keys)}")
        cells = [c for row in self.rows for c in row.cells]
        for c in cells:
            if not (c.head.isdigit() or c.head in ("best", "last")):
                raise ValueError(f"study {self.name}: head selector {c.head!r} is not an "
                                 "index, 'best' or 'last'")
            if c.epoch not in ("last", "holdout") or (c.epoch == "holdout"
                                                       and not c.head.isdigit()):
                raise ValueError(f"study {self.name}: epoch selector {c.epoch!r} is not 'last' "
                                 "or 'holdout' (with a head index)")
            if c.weights not in ("live", "ema") or (c.weights == "ema" and c.epoch != "last"):
                raise ValueError(f"study {self.name}: weights {c.weights!r} is not 'live' or "
                                 "'ema' (the last epoch's)")
        for column in {c.column for c in cells}:
            if sum(c.baseline for c in cells if c.column == column) > 1:
                raise ValueError(f"study {self.name}: column {column!r} has several baselines")
        extras = [e.key for e in self.extras]
        for key in extras:
            if key in RESULT_KEYS or extras.count(key) > 1:
                raise ValueError(f"study {self.name}: extra key {key!r} is taken")

    def rows_for(self, budget: str) -> tuple[Row, ...]:
        """The rows that run on ``budget``, in table order."""
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
