"""Shared helpers for the surgery / graph / export / CLI tests.

Everything runs on CPU with tiny inputs (32 px, batch 2); no network is ever used.
"""
from __future__ import annotations

import os

# timm and huggingface_hub read this when they are imported: loading weights from a local file
# (``pretrained_cfg_overlay=dict(file=...)``) must never try to reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def make_input(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A deterministic random image batch ``[batch, 3, size, size]``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal where the op order is identical, else float32 tolerance (DESIGN 3)."""
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def one_line_error(stderr: str) -> str:
    """The CLI's error output must be exactly one line, and never a traceback."""
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("collabsurgery: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, unless OMP_NUM_THREADS says otherwise.

    On a small shared CPU machine, two OpenMP threads competing with other processes ran these
    tiny convolutions up to 30x slower than one thread.
    """
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
