"""``tools/bench_cgl.py``: one row per (K, p) with positive ratios, epoch ratio = step ratio / K,
a parameter count that does not depend on K, and imitation counts that match the draws.
Timings are never asserted (noisy on a shared machine)."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from helpers import load_tool

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")
bench_cgl = load_tool("bench_cgl")
ARGV = ["--students", "2,3", "--probabilities", "0.5,1", "--image-size", "8", "--batch-size",
        "4", "--num-classes", "10", "--repeats", "1", "--warmup", "1", "--expectation-draws",
        "20", "--json"]


@pytest.fixture(scope="module")
def result() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert bench_cgl.main(ARGV) == 0
    return json.loads(out.getvalue())


def test_one_row_per_students_and_probability(result):
    assert [(r["students"], r["probability"]) for r in result["rows"]] == \
        [(2, 0.5), (2, 1.0), (3, 0.5), (3, 1.0)]
    assert [r["students"] for r in result["independent"]] == [2, 3]
    # the default split: every block boundary of cifar_resnet20, stages of one block each
    assert result["split"] == ["layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1",
                               "layer2", "layer3.0", "layer3.1"]
    assert result["stages"] == 9 and math.isclose(sum(result["stage_flop_shares"]), 1.0)
    assert "torch" in result["device"] and result["threads"] == 1


def test_ratios_are_positive_and_epoch_is_step_over_k(result):
    assert result["single"]["step_ms"] > 0 and result["single"]["forward_ms"] > 0
    for row in result["rows"] + result["independent"]:
        k = row["students"]
        assert math.isfinite(row["step_ratio"]) and row["step_ratio"] > 0
        assert row["step_ratio_min"] > 0 and row["minor_faults"] >= 0
        assert math.isclose(row["epoch_ratio"], row["step_ratio"] / k)
        assert math.isclose(row["per_example_ratio"], row["step_ratio"] / k)
    assert "N/(K B)" in result["epoch_derivation"]


def test_parameters_do_not_depend_on_students(result):
    plain = result["single"]["params"]
    for row in result["rows"] + result["independent"]:
        assert row["params"] == 2 * plain  # M = 2 modules per stage, any K
    assert all(row["param_ratio"] == 2 for row in result["rows"])


def test_imitation_counts_match_the_draws_and_bound_the_forwards(result):
    for row in result["rows"]:
        k, p = row["students"], row["probability"]
        assert row["imitated_expected"] == k * (k - 1) * p
        assert 0 <= row["imitated_mean"] <= k * (k - 1)
        if p == 1.0:  # everyone imitates everyone: no randomness
            assert row["imitated_mean"] == k * (k - 1)
            assert row["forward_equivalents"] == row["forward_equivalents_expected"]
        # prefixes shared with student k are reused: at most one forward per imitated student
        assert 0 <= row["forward_equivalents"] <= row["imitated_mean"] + 1e-9


def test_table_has_a_line_per_row_and_the_epoch_derivation(result):
    table = bench_cgl.format_table(result)
    assert "epoch ratio = step ratio / K" in table and "step@E" in table
    assert len([line for line in table.splitlines() if line[:2].strip() in ("2", "3")]) == 6


def test_bad_probability_is_a_user_error(capsys):
    assert bench_cgl.main(["--probabilities", "0", "--image-size", "8"]) == 2
    assert "every p must be in (0, 1]" in capsys.readouterr().err


def test_compare_execution_gives_a_ratio_per_students(capsys):
    assert bench_cgl.main(["--compare-execution", "--students", "2", "--image-size", "8",
                           "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["students"] == 2 and row["loop_ms"] > 0 and row["concat_ms"] > 0
    assert row["concat_over_loop"] == pytest.approx(row["concat_ms"] / row["loop_ms"])
