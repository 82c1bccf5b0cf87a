"""``collabsurgery bench``: the JSON fields exist and are finite, one entry per execution mode.

Measured times and memory are asserted finite and positive only (they depend on the machine;
docs/benchmarks.md has the figures); FLOP ratios are exact."""
from __future__ import annotations

import contextlib
import io
import json
import math
import mmap

import pytest

from collabsurgery.cli import main
from collabsurgery.measure.bench import format_table, minor_faults

from helpers import one_line_error

FIELDS = ("time_ratio", "stage_limit_ratio", "flop_ratio", "mem_ratio")


@pytest.fixture(scope="module")
def result() -> dict:
    argv = ["bench", "cifar_resnet20", "--split", "layer1", "--heads", "2", "--image-size", "32",
            "--batch-size", "4", "--repeats", "2", "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def test_json_has_finite_ratios_per_mode(result):
    assert [e["mode"] for e in result["modes"]] == ["loop", "fused", "packed", "auto"]
    for entry in result["modes"]:
        for key in FIELDS:
            assert math.isfinite(entry[key]) and entry[key] > 0, (entry["mode"], key)
        assert entry["device"] and "torch" in entry["device"]
        assert entry["checkpoint"] is False
    assert "layer1..output: 2 copies in groups of 2, running fused" in result["modes"][1]["notes"]
    assert "layer1..output: 2 copies in groups of 2, running packed" in result["modes"][2]["notes"]


def test_limit_and_flop_ratios_lie_between_one_and_the_head_count(result):
    plain = result["plain"]
    assert plain["stage_copies"] == [1, 2]
    # 2 heads split after layer1: the stem runs once and the branch twice, so the limit
    # (t0 + 2 t1) / (t0 + t1) and the FLOP ratio lie in (1, 2) whatever the times measured
    for entry in result["modes"]:
        assert 1 < entry["stage_limit_ratio"] < 2 and 1 < entry["flop_ratio"] < 2
    assert math.isfinite(plain["stage_sum_ratio"]) and plain["stage_sum_ratio"] > 0


def test_table_shows_the_limit_every_mode_and_page_faults(result):
    table = format_table(result)
    assert "stage-time limit" in table and "packed" in table
    assert "page faults" in table  # a CPU run shows them per step
    assert all(e["minor_faults"] >= 0 for e in (result["plain"], *result["modes"]))


def test_minor_faults_count_fresh_memory():
    """What the faults column counts: touching memory just taken from the system. The block is
    mapped here (an anonymous mmap), not through the allocator, which may hand back memory it
    already holds (a 64 MB tensor once came without a single new fault in a long test run)."""
    if minor_faults() == 0:
        pytest.skip("no resource module here")
    block = mmap.mmap(-1, 64 * 2**20)
    before = minor_faults()
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    assert minor_faults() > before
    block.close()


def test_checkpoint_adds_an_entry_per_recomputation_setting(capsys):
    argv = ["bench", "cifar_resnet20", "--split", "layer1", "--heads", "2", "--image-size", "32",
            "--batch-size", "4", "--repeats", "1", "--warmup", "1", "--execution", "loop",
            "--checkpoint", "--json"]
    assert main(argv) == 0
    entries = json.loads(capsys.readouterr().out)["modes"]
    assert [(e["mode"], e["checkpoint"]) for e in entries] == [
        ("loop", False), ("loop", True), ("loop", "selective")]
    # the memory recomputation saves is measured, so machine-dependent: docs/benchmarks.md has
    # it, and test_lean_execution.py asserts the order of the peaks
    for entry in entries:
        for key in FIELDS:
            assert math.isfinite(entry[key]) and entry[key] > 0, (entry["mode"], key)


def test_bad_mode_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "cifar_resnet20", "--split", "layer1", "--execution", "vmap"])
    assert exc.value.code == 2
    assert "unknown execution mode 'vmap'" in capsys.readouterr().err


def test_bad_split_is_a_user_error(capsys):
    assert main(["bench", "cifar_resnet20", "--split", "nope", "--image-size", "32"]) == 2
    assert "valid split points" in one_line_error(capsys.readouterr().err)
