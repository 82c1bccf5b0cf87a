"""``tools/bench_intra.py``: plain, dropout views, tree and tree at the dropout points, with as
many heads as views, positive ratios, one weight set for the views, and one-line errors.
Measured times and memory are never asserted beyond being finite and positive (they depend on
the machine; docs/benchmarks.md has the figures); FLOPs, parameters and the saved-tensor memory
estimate are exact and are.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from collabsurgery.measure.bench import memory_method

from helpers import load_tool

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")
bench_intra = load_tool("bench_intra")
TINY = ["--image-size", "16", "--batch-size", "2", "--repeats", "1", "--warmup", "1"]
ARGV = [*TINY, "--dropout-split", "layer3,global_pool", "--tree-split", "layer2,layer3",
        "--json"]


def _run(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert bench_intra.main(argv) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def result() -> dict:
    return _run(ARGV)


def test_variants_have_as_many_heads_as_views(result):
    rows = {r["name"]: r for r in result["variants"]}
    assert list(rows) == ["plain", "dropout", "tree", "tree_same"] and result["skipped"] == []
    assert [r["heads"] for r in rows.values()] == [1, 4, 4, 4] and result["views"] == 4
    assert rows["dropout"]["split"] == ["layer3", "global_pool"] == result["dropout_points"]
    assert rows["tree"]["split"] == ["layer2", "layer3"] and rows["tree"]["branches"] == [2, 2]
    assert rows["tree_same"]["split"] == ["layer3", "global_pool"]
    assert rows["tree_same"]["branches"] == [2, 2]
    assert rows["dropout"]["loss_weight"] == 0.25 and rows["tree"]["loss_weight"] == 1.0
    # one weight set for the views; the tree copies layer3 twice and the classifier four times
    assert rows["dropout"]["params"] == rows["plain"]["params"] < rows["tree"]["params"]
    assert "torch" in result["device"] and result["threads"] == 1
    assert result["clock"] == "process"
    assert result["mem_method"] == memory_method(torch.device("cpu"))  # what bench measures


def test_ratios_are_positive_and_against_plain(result):
    rows = {r["name"]: r for r in result["variants"]}
    for row in rows.values():
        for key in ("time_ratio", "time_ratio_min", "flop_ratio", "mem_ratio",
                    "dropout_mem_over"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["step_ms"] > 0 and row["mem_mb"] > 0
        assert row["mem_ratio"] == pytest.approx(row["mem_mb"] / rows["plain"]["mem_mb"])
        assert row["dropout_mem_over"] == pytest.approx(rows["dropout"]["mem_mb"] / row["mem_mb"])
    plain = rows["plain"]
    assert plain["time_ratio"] == plain["flop_ratio"] == plain["mem_ratio"] == 1.0
    assert 1.0 <= rows["dropout"]["flop_ratio"] < rows["tree"]["flop_ratio"]  # FLOPs: exact


def test_memory_estimate_orders_the_variants(monkeypatch):
    """Without the C heap's peak (no glibc) the tool reports the exact estimate: parameters,
    gradients and tensors saved for backward. The views add their masks and late activations to
    the plain model's, no weights; copies add weights and gradients, the tree copies the most."""
    monkeypatch.setattr("collabsurgery.measure.bench.can_measure_cpu_peak", lambda: False)
    result = _run(ARGV)
    assert result["mem_method"] == "estimate: params + grads + tensors saved for backward"
    mem = {r["name"]: r["mem_mb"] for r in result["variants"]}
    assert mem["plain"] < mem["dropout"] < mem["tree"]
    assert mem["plain"] < mem["tree_same"] < mem["tree"]


def test_table_has_a_line_per_variant_and_the_views(result):
    table = bench_intra.format_table(result)
    assert "-> 4 views" in table and "dropout/this" in table and "threads: 1" in table
    for name in ("plain", "dropout", "tree", "tree_same"):
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    assert "layer2,layer3 (2x2)" in table


def test_tree_at_the_dropout_points_is_skipped_with_a_reason(capsys):
    result = _run([*TINY, "--dropout-split", "layer3", "--tree-split", "layer3", "--json"])
    assert [r["name"] for r in result["variants"]] == ["plain", "dropout", "tree"]
    assert [r["heads"] for r in result["variants"]] == [1, 2, 2]
    (skipped,) = result["skipped"]
    assert skipped["name"] == "tree_same" and "are the dropout points (layer3)" in \
        skipped["reason"]
    table = bench_intra.format_table(result)
    assert "tree_same  skipped: the tree's points are the dropout points" in table


@pytest.mark.parametrize("argv, message", [
    (["--samples", "1"], "error: samples must be >= 2"),
    (["--dropout-p", "1"], "error: dropout p must be in [0, 1)"),
    ([*TINY, "--dropout-split", "layer3", "--tree-split", "layer3,layer2"],
     "error: heads=2 cannot be spread over 2 split points"),
])
def test_bad_options_are_one_line_errors(capsys, argv, message):
    assert bench_intra.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_default_points_are_the_middle_ones_with_even_branches():
    points = ["a", "b", "c", "d", "e"]
    assert bench_intra.middle_points(points, 2) == ["b", "c"]
    assert bench_intra.middle_points(points, 1) == ["c"]
    assert bench_intra.middle_points(points, 5) == points
    with pytest.raises(ValueError, match="give --tree-split"):
        bench_intra.middle_points(points, 6)
    assert bench_intra.tree_branches(8, 3, 2, 3) == (2, 2, 2)
    assert bench_intra.tree_branches(4, 2, 2, 2) == (2, 2)
    assert bench_intra.tree_branches(8, 2, 2, 3) == (2, 4)  # even_branches
