"""Batch providers: what the engine trains on, as ``(x, labels)`` pairs.

- :class:`SharedBatches` with ``views=1``: one batch every head sees, ``x`` ``[B, ...]``.
- :class:`SharedBatches` with ``views=H``: the same images, but head h sees its own augmentation
  of them (KDCL's invariant collaborative learning), ``x`` ``[H, B, ...]``; labels ``[B]``.
- :class:`SubsetBatches`: student k trains only on its own seeded subset of the training set
  (paper 002's sub-set data learning), ``x`` ``[K, B, ...]``, labels ``[K, B]``.

A provider owns its DataLoader(s); :meth:`prepare` hands them to Accelerate (sharding across
processes, the seedable sampler), :meth:`set_epoch` selects the epoch's data order and
augmentation, and :meth:`batches` yields an epoch's batches from batch ``skip`` on, so a resumed
run continues mid-epoch exactly where it stopped.

Their samplers yield ``(epoch, index)`` pairs, and the training dataset draws example ``index``
of ``epoch`` (:class:`~collabsurgery.data.datasets.TrainDataset`): the epoch reaches DataLoader
workers with every index, so workers can be persistent (``persistent_workers=True``: they keep
their own copy of the dataset, which :meth:`set_epoch` in the main process would not reach).
:func:`loader_options` gives the DataLoader settings: workers, persistent when there are any,
``prefetch_factor``, pinned memory (for a CUDA device).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from collabsurgery.common.seeding import generator
from collabsurgery.data.datasets import TrainDataset
from collabsurgery.errors import UserError


def loader_options(num_workers: int = 0, pin_memory: bool = False,
                   prefetch_factor: int | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments: ``num_workers`` processes, persistent (started once per
    loader, not every epoch) and each loading ``prefetch_factor`` batches ahead (None:
    PyTorch's 2) when there are any; ``pin_memory`` for a CUDA device (faster copies)."""
    options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=prefetch_factor or 2)
    return options


class EpochBatches(BatchSampler):
    """A BatchSampler whose batches are ``(epoch, index)`` pairs, so the epoch travels with
    every index to the dataset (in the main process or any worker). The order is the plain
    BatchSampler's over ``sampler`` (which Accelerate replaces with its seedable sampler);
    :meth:`set_epoch` selects the epoch written into the pairs."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the pairs carry."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in super().__iter__():
            yield [(epoch, i) for i in batch]


class SharedBatches:
    """Mini-batches of one training set; with ``views > 1`` each head gets its own view."""

    def __init__(self, dataset: TrainDataset, batch_size: int, num_workers: int = 0, *,
                 pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.sampler = EpochBatches(RandomSampler(dataset), batch_size, drop_last=True)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler,
                                 **loader_options(num_workers, pin_memory, prefetch_factor))

    def prepare(self, accelerator: Accelerator) -> None:
        """Let Accelerate shard the loader and seed its sampler."""
        self.accelerator = accelerator
        self.loader = accelerator.prepare(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order, augmentation and noisy labels."""
        self.dataset.set_epoch(epoch)  # for direct indexing; the loader's indices carry it
        self.sampler.set_epoch(epoch)  # directly: behind Accelerate's shard it is not reached
        self.loader.set_epoch(epoch)

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's ``(x, labels)`` from batch ``skip`` on."""
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        for images, labels in loader:
            yield self.arrange(images, labels)

    def arrange(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A loader batch as the graph takes it: views ``[B, H, ...]`` -> ``[H, B, ...]``."""
        return (images.transpose(0, 1) if self.dataset.views > 1 else images), labels


def _subset_size(examples: int, students: int, overlap: float) -> int:
    """The smallest subset: the smallest share plus its overlap (none with one student)."""
    share = examples // students
    return share + min(round(overlap * share), examples - share)


class _Steps(Sampler[list[tuple[int, int]]]):
    """Batch sampler: step j is batch j of every student's shuffled subset, concatenated."""

    def __init__(self, subsets: list[Tensor], batch_size: int, seed: int):
        self.subsets, self.seed, self.epoch = subsets, seed, 0
        self.student_batch = batch_size
        self.batch_size = len(subsets) * batch_size  # BatchSamplerShard keeps only full batches
        self.drop_last = True  # BatchSamplerShard: every process the same number of steps
        self.steps = min(len(s) for s in subsets) // batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n, b, epoch = self.steps, self.student_batch, self.epoch
        orders = [s[torch.randperm(len(s), generator=generator("subset-order", self.seed,
                                                                epoch, k))][: n * b]
                  for k, s in enumerate(self.subsets)]
        for step in torch.stack(orders).view(len(orders), n, b).transpose(0, 1).flatten(1):
            yield [(epoch, i) for i in step.tolist()]


class SubsetBatches(SharedBatches):
    """Sub-set data learning (paper 002): student k trains only on its own subset.

    The training set is split once, by ``generator("subsets", seed)``, into ``students`` disjoint
    shares of (nearly) equal size; with ``overlap`` o each subset is its share plus
    ``round(o * len(share))`` examples drawn without replacement from the other shares
    (against under-fitting with many students). ``subsets[k]`` holds student k's dataset indices.
    Every epoch each subset is shuffled by ``generator("subset-order", seed, epoch, k)`` and cut
    into batches of ``batch_size`` (the last incomplete one dropped); step j is batch j of every
    student, ``x`` ``[K, B, ...]`` and labels ``[K, B]``; an epoch has as many steps as the
    smallest subset has batches.

    One DataLoader serves all students, its batch sampler yielding a step's K*B indices, so
    Accelerate shards it as usual: with P processes, process p gets whole steps p, p + P, ...
    and, as the sampler declares ``drop_last``, every process the same ``steps // P`` steps
    (the remainder is dropped, never padded by cycling, whatever ``even_batches`` says).
    Accelerate's seedable sampler does not apply (the sampler is seeded itself) and
    ``skip_first_batches`` resumes mid-epoch exactly. Call :meth:`set_epoch` before every epoch:
    a prepared loader re-applies its own epoch counter (one more per full pass) to the sampler
    and the dataset each time it is iterated. Not with ``split_batches``, which would cut a step
    between students.
    """

    def __init__(self, dataset: TrainDataset, students: int, batch_size: int,
                 overlap: float = 0.0, seed: int = 0, num_workers: int = 0, *,
                 pin_memory: bool = False, prefetch_factor: int | None = None):
        if students < 1:
            raise UserError(f"sub-set data learning needs at least 1 student, got {students}")
        if not 0 <= overlap < 1:
            raise UserError(f"data.subset_overlap must be in [0, 1), got {overlap}")
        self.dataset, self.students, self.batch_size, self.overlap = (
            dataset, students, batch_size, overlap)
        self._check_fits(1)
        n = len(dataset)
        shares = torch.randperm(n, generator=generator("subsets", seed)).tensor_split(students)
        self.subsets: list[Tensor] = []
        for k, share in enumerate(shares):
            others = torch.cat([s for j, s in enumerate(shares) if j != k])
            extra = min(round(overlap * len(share)), len(others))
            pick = torch.randperm(len(others), generator=generator("subset-overlap", seed, k))
            self.subsets.append(torch.cat([share, others[pick[:extra]]]).sort().values)
        self.sampler = _Steps(self.subsets, batch_size, seed)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler,
                                 **loader_options(num_workers, pin_memory, prefetch_factor))

    def _check_fits(self, processes: int) -> None:
        n, k, b = len(self.dataset), self.students, self.batch_size
        need = b * processes
        if _subset_size(n, k, self.overlap) >= need:
            return
        most = max((s for s in range(1, k) if _subset_size(n, s, self.overlap) >= need),
                   default=0)
        raise UserError(f"{n} training examples split among {k} students leave "
                        f"{_subset_size(n, k, self.overlap)} in the smallest subset, fewer than "
                        f"one batch of {b} x {processes} process(es); valid: "
                        + (f"at most {most} students, " if most else "")
                        + "a smaller batch size or more training examples")

    def prepare(self, accelerator: Accelerator) -> None:
        """Let Accelerate shard the loader: whole steps per process, as many on each."""
        if accelerator.split_batches:
            raise UserError("sub-set data learning needs whole steps per process; "
                            "turn off Accelerate's split_batches")
        self._check_fits(accelerator.num_processes)
        super().prepare(accelerator)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order, augmentation and noisy labels."""
        self.sampler.set_epoch(epoch)  # directly: a sharded loader's set_epoch misses it
        if hasattr(self.loader, "set_epoch"):  # prepared: it re-applies its epoch on every iter
            super().set_epoch(epoch)
        else:
            self.dataset.set_epoch(epoch)

    def arrange(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A step's ``K * B`` examples as ``[K, B, ...]`` and labels ``[K, B]``."""
        return images.unflatten(0, (self.students, -1)), labels.view(self.students, -1)
