"""Run a paper study as a grid of recipes over seeds (same as ``collabsurgery reproduce``).

    python tools/reproduce.py clilr-table1 --seeds 5                       # small budget, CPU
    python tools/reproduce.py clilr-noise --budget full data.source=/data/cifar10
    python tools/reproduce.py clilr-table1 --max-runs 0                     # rewrite the report
    python tools/reproduce.py --all                                         # every study, index

Finished runs are skipped and interrupted ones resumed, so the same command continues a study.
The report and plots go to studies/<study>-<budget>/; --all also writes an index page linking
every report with a one-line verdict summary (--index PATH to put it elsewhere).
"""
import sys

from collabsurgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
