"""Run a probe forward (tracing, validation, timing, cost counting) and leave a model as it was."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


class BufferSnapshot:
    """The buffers of ``modules`` (and their submodules) now; :meth:`restore` puts them back.

    The original tensor objects are put back, not just their values: a module may *replace* a
    buffer during a forward (timm's ConViT swaps ``rel_indices`` for one of another shape when
    the input size changes), and copying the old values into the new tensor would broadcast
    stale numbers into it and keep the wrong shape, silently changing the model.
    """

    def __init__(self, *modules: nn.Module):
        self.saved = [(module, dict(module._buffers), set(module._non_persistent_buffers_set),
                       {name: b.clone() for name, b in module._buffers.items() if b is not None})
                      for root in modules for module in root.modules()]

    def restore(self) -> None:
        """Every submodule holds its original buffer tensors again, with their values."""
        with torch.no_grad():
            for module, buffers, non_persistent, values in self.saved:
                module._buffers.clear()
                module._buffers.update(buffers)
                module._non_persistent_buffers_set.clear()
                module._non_persistent_buffers_set.update(non_persistent)
                for name, value in values.items():
                    buffers[name].copy_(value)


@contextmanager
def preserved_buffers(*modules: nn.Module) -> Iterator[None]:
    """Within the block ``modules`` may change or replace their buffers; afterwards they are
    as before (see :class:`BufferSnapshot`)."""
    snapshot = BufferSnapshot(*modules)
    try:
        yield
    finally:
        snapshot.restore()
