"""Sub-set data learning (paper 002): the seeded split, per-student batches, Accelerate sharding
and exact resume, user errors, and a short run through the engine and the CLI.

The provider tests use 64 built-in digits at 8 px whose labels are replaced by their row
numbers, so every yielded label says which example it came from.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState

from collabsurgery import cli
from collabsurgery.config.recipe import load_recipe
from collabsurgery.data.batches import SubsetBatches
from collabsurgery.data.datasets import TrainDataset, load_splits
from collabsurgery.errors import UserError
from collabsurgery.train import engine

from helpers import one_line_error

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
TINY = ["data.image_size=16", "data.max_train_examples=64", "train.batch_size=8",
        "train.epochs=1", "run.progress=false"]
INSTANCES = ["graph={pattern: instances, heads: 2}", "objective={name: single}"]


@pytest.fixture(scope="module", autouse=True)
def _quiet_cpu(one_thread):
    """One thread (conftest), and no Accelerate state left behind."""
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def tagged() -> TrainDataset:
    """64 training examples whose label is their row number."""
    train = copy.copy(load_splits(image_size=8, max_train_examples=64, augment=False).train)
    train.labels = torch.arange(len(train))
    return train


def epoch_of(provider: SubsetBatches, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    """The label rows ``[K, B]`` of every step of ``epoch`` from step ``skip`` on."""
    provider.set_epoch(epoch)
    return [labels for _, labels in provider.batches(skip)]


def test_subsets_are_disjoint_shares_covering_the_training_set(tagged):
    subsets = SubsetBatches(tagged, 3, 4).subsets
    assert sorted(len(s) for s in subsets) == [21, 21, 22]
    everything = torch.cat(subsets)
    assert torch.equal(everything.sort().values, torch.arange(64))


def test_overlap_adds_the_right_number_of_other_examples_without_duplicates(tagged):
    plain, overlapping = SubsetBatches(tagged, 3, 4).subsets, SubsetBatches(tagged, 3, 4, 0.5)
    for k, (share, subset) in enumerate(zip(plain, overlapping.subsets)):
        assert len(subset.unique()) == len(subset) == len(share) + round(0.5 * len(share))
        assert set(share.tolist()) <= set(subset.tolist())  # the same shares, plus others'
        others = set(torch.cat([s for j, s in enumerate(plain) if j != k]).tolist())
        assert set(subset.tolist()) - set(share.tolist()) <= others


def test_split_is_fixed_by_the_seed(tagged):
    def split(seed):
        return [s.tolist() for s in SubsetBatches(tagged, 2, 4, 0.25, seed=seed).subsets]

    assert split(0) == split(0)
    assert split(0) != split(1)


def test_row_k_comes_only_from_subset_k_and_orders_are_seeded_per_epoch(tagged):
    provider = SubsetBatches(tagged, 3, 4, overlap=0.5)
    assert len(provider) == min(len(s) for s in provider.subsets) // 4
    x, labels = next(provider.batches())
    assert x.shape == (3, 4, 3, 8, 8) and labels.shape == (3, 4)
    first = epoch_of(provider, 0)
    assert len(first) == len(provider)
    for labels in first:
        for k in range(3):
            assert set(labels[k].tolist()) <= set(provider.subsets[k].tolist())
    for k in range(3):  # within an epoch a student sees each of its examples at most once
        seen = torch.cat([labels[k] for labels in first])
        assert len(seen.unique()) == len(seen)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch_of(provider, 0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, epoch_of(provider, 1)))


def test_resume_skips_exactly_the_first_steps(tagged):
    AcceleratorState._reset_state()
    provider = SubsetBatches(tagged, 2, 4)
    provider.prepare(Accelerator(cpu=True))
    full = epoch_of(provider, 2)
    assert len(full) == 8
    tail = epoch_of(provider, 2, skip=3)
    assert len(tail) == 5 and all(torch.equal(a, b) for a, b in zip(full[3:], tail))


@pytest.mark.parametrize("processes", [2, 3])
def test_accelerate_gives_each_process_different_whole_steps_as_many_on_each(tagged, processes):
    provider = SubsetBatches(tagged, 2, 4)  # 8 steps an epoch
    full = epoch_of(provider, 1)
    sharded = []
    for p in range(processes):
        shard = SubsetBatches(tagged, 2, 4)
        shard.loader = prepare_data_loader(shard.loader, num_processes=processes,
                                           process_index=p)
        assert len(shard) == 8 // processes
        sharded.append(epoch_of(shard, 1))  # set_epoch reaches the wrapped sampler
    assert [len(steps) for steps in sharded] == [8 // processes] * processes
    for j in range(8 // processes):  # step j of process p is step j * P + p of the epoch
        for p in range(processes):
            assert torch.equal(sharded[p][j], full[j * processes + p])


@pytest.mark.parametrize("args, named", [
    ((0, 4), "at least 1 student"),
    ((2, 4, 1.0), "[0, 1)"),
    ((2, 4, -0.1), "[0, 1)"),
    ((9, 8), "at most 8 students"),          # 64 examples / 9 = 7 each, fewer than a batch of 8
    ((3, 32, 0.5), "at most 2 students"),    # 21 + 10 < 32 <= 32 + 16
], ids=["no-students", "overlap-1", "overlap-negative", "too-many-students", "with-overlap"])
def test_bad_subsets_are_one_line_user_errors(tagged, args, named):
    with pytest.raises(UserError) as caught:
        SubsetBatches(tagged, *args)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_too_many_students_for_the_processes_is_refused_at_prepare(tagged):
    class TwoProcesses:  # what prepare reads of an Accelerator
        split_batches, num_processes = False, 2

    provider = SubsetBatches(tagged, 5, 8)  # 12 per student: one batch, not one per process
    with pytest.raises(UserError, match="x 2 process.*at most 4 students"):
        provider.prepare(TwoProcesses())


@pytest.mark.slow
def test_engine_trains_each_instance_on_its_own_subset(tmp_path):
    recipe = load_recipe(None, [*TINY, *INSTANCES, "data.subsets=true",
                                "data.subset_overlap=0.25", f"run.dir={tmp_path}"])
    session = engine.setup(recipe)
    assert isinstance(session.batches, SubsetBatches)
    assert len(session.batches) == 5 and len(session.batches.subsets) == 2  # 32 + 8 each
    run_dir = engine.train(recipe)
    assert len(engine.history_of(run_dir)) == 1


@pytest.mark.parametrize("overrides, named", [
    (["data.subsets=true"], "pattern 'tree'"),
    ([*INSTANCES, "data.subsets=true", "data.views=per_head"], "data.views=per_head"),
    ([*INSTANCES, "data.subsets=true", "data.subset_overlap=1.0"], "data.subset_overlap"),
    (["graph={pattern: instances, heads: 2}", "data.subsets=true"], "objective 'consensus' "
     "compares the heads example by example"),
], ids=["shared-layers", "per-head-views", "overlap-1", "objective"])
def test_bad_subset_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, overrides,
                                                                 named):
    runs = tmp_path / "runs"
    argv = ["train", "--recipe", str(DEMO), *TINY, f"run.dir={runs}", *overrides]
    assert cli.main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert named in line, line
    assert not runs.exists()
