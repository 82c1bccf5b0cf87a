"""Peak memory of a training step where the allocator keeps no statistics (the CPU).

On CUDA, ``torch.cuda.max_memory_allocated`` is the measure. The CPU allocator has no such
counter, so :class:`HeapPeak` asks the C library's allocator (glibc's ``mallinfo2``: bytes in
use, small and ``mmap``-ed blocks) after every op of forward and backward that a dispatch mode
sees, recomputation in backward included. Its peak above the level at the start is what the step
holds at once: activations kept for backward, gradients as they appear, recomputed segments and
op outputs; like the CUDA figure, minus the caching allocator's rounding.

(Counting tensor storages through weak references was tried first: torch may hand out two Python
objects for one storage, e.g. a gradient and its ``detach``, so it counted some memory twice.)
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):  # not glibc >= 2.33 (macOS, musl, Windows)
        return None
    fn.restype = _MallInfo2
    return fn


def heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not taken back, or None where unknown."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def can_measure_cpu_peak() -> bool:
    """Whether :class:`HeapPeak` works here (glibc's allocator)."""
    return heap_in_use() is not None


class HeapPeak(TorchDispatchMode):
    """Within the block, ``peak``: the most C-heap bytes in use after any op, above the level
    when the block was entered."""

    def __enter__(self) -> "HeapPeak":
        self.start = heap_in_use()
        if self.start is None:
            raise RuntimeError("this C library has no mallinfo2; see can_measure_cpu_peak()")
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use() - self.start)
        return out


def state_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()))


def step_peak_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Peak memory of ``step`` (forward and backward of ``model``, warmed up): the CUDA
    allocator's peak, or on the CPU the model's parameters and buffers plus the
    :class:`HeapPeak` of the step."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with HeapPeak() as heap:
        step()
    return state_bytes(model) + heap.peak
