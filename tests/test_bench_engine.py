"""``tools/bench_engine.py``: the engine's ``train_epoch`` against a bare PyTorch loop.

The tool runs and reports both models (the single model and the 4-head tree) with finite,
positive times and ratios, and its comparison is like for like: both sides start from the same
weights and give the same loss on the same first batch. Measured times are never asserted
beyond that (they depend on the machine; docs/benchmarks.md has the figures).
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from helpers import load_tool

pytestmark = pytest.mark.usefixtures("one_thread", "forget_accelerate_state")
bench_engine = load_tool("bench_engine")
TINY = ["--image-size", "16", "--batch-size", "4", "--steps", "2", "--repeats", "2",
        "--warmup", "1"]


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench_engine.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def result() -> dict:
    code, out, _ = _main([*TINY, "--breakdown", "--breakdown-calls", "3", "--json"])
    assert code == 0
    return json.loads(out)


def test_both_models_with_finite_ratios(result):
    rows = {r["name"]: r for r in result["models"]}
    assert list(rows) == ["single", "tree"]
    assert rows["single"]["heads"] == 1 and rows["tree"]["heads"] == 4
    assert rows["tree"]["split"] == ["layer1", "layer2"]
    assert rows["single"]["objective"] == "single" and rows["tree"]["objective"] == "consensus"
    for row in rows.values():
        for key in ("engine_ms", "bare_ms", "ratio", "ratio_min", "paired_ratio",
                    "engine_spread", "bare_spread"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["name"], key)
        assert row["engine_ms"] > 0 and row["bare_ms"] > 0
        assert row["ratio"] == pytest.approx(row["engine_ms"] / row["bare_ms"])
        assert len(row["engine_round_ms"]) == len(row["bare_round_ms"]) == 2
        assert row["paired_ratio_min"] <= row["paired_ratio"] <= row["paired_ratio_max"]
    assert result["threads"] == 1 and result["clock"] == "process" and "torch" in result["device"]


def test_same_weights_and_same_first_loss(result):
    """Like for like: the bare loop's graph and objective are the engine's (same initial
    weights), and on the same first batch both give the same loss (x loss_weight)."""
    for row in result["models"]:
        assert row["same_init"], row["name"]
        assert math.isfinite(row["first_loss_engine"])
        assert row["first_loss_bare"] == pytest.approx(row["first_loss_engine"], rel=1e-6)


def test_breakdown_names_the_engine_lines(result):
    single, tree = result["models"]
    assert "breakdown" not in tree  # the first model only
    pieces = {b["name"]: b for b in single["breakdown"]}
    assert {"reseed", "Step", "non-finite check", "optimizer.step wrapper"} <= set(pieces)
    for b in pieces.values():
        assert (b["us"] is not None and b["us"] > 0) or b["skipped"], b
    assert single["breakdown_depth"] > 0


def test_table_prints_both_rows(result):
    table = bench_engine.format_table(result)
    lines = table.splitlines()
    for name in ("single", "tree"):
        row = next(line for line in lines if line.startswith(name + " "))
        assert math.isfinite(float(row.split()[4]))  # the ratio column
    assert "reseed" in table and "torch.manual_seed" in table


def test_bad_setting_is_one_line():
    code, out, err = _main([*TINY, "--steps", "0"])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: steps")
    code, _, err = _main([*TINY, "--models", "single,forest"])
    assert code == 2 and "unknown model 'forest'" in err
