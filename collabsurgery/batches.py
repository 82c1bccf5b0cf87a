"""Batch providers: what the engine trains on, as ``(x, labels)`` pairs.

- :class:`SharedBatches` with ``views=1``: one batch every head sees, ``x`` ``[B, ...]``.
- :class:`SharedBatches` with ``views=H``: the same images, but head h sees its own augmentation
  of them (KDCL's invariant collaborative learning), ``x`` ``[H, B, ...]``; labels ``[B]``.

A provider owns its DataLoader(s); :meth:`prepare` hands them to Accelerate (sharding across
processes, the seedable sampler), :meth:`set_epoch` selects the epoch's data order and
augmentation, and :meth:`batches` yields an epoch's batches from batch ``skip`` on, so a resumed
run continues mid-epoch exactly where it stopped.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from .data import TrainDataset


class SharedBatches:
    """Mini-batches of one training set; with ``views > 1`` each head gets its own view."""

    def __init__(self, dataset: TrainDataset, batch_size: int, num_workers: int = 0):
        self.dataset = dataset
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                 num_workers=num_workers)

    def prepare(self, accelerator: Accelerator) -> None:
        """Let Accelerate shard the loader and seed its sampler."""
        self.accelerator = accelerator
        self.loader = accelerator.prepare(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order, augmentation and noisy labels."""
        self.dataset.set_epoch(epoch)
        self.loader.set_epoch(epoch)

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's ``(x, labels)`` from batch ``skip`` on."""
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        for images, labels in loader:
            if self.dataset.views > 1:  # [B, H, ...] -> [H, B, ...]
                images = images.transpose(0, 1)
            yield images, labels
