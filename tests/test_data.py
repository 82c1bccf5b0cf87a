"""Datasets and splits: built-in digits, local directories, label noise, deterministic views."""

import dataclasses

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from collabsurgery.config.recipe import DataConfig, data_arguments
from collabsurgery.data.datasets import BUILTIN_DIGITS_LOWRES, corrupted_examples, load_splits
from collabsurgery.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return load_splits(**data_arguments(DataConfig(label_noise=0.3)), seed=0)


@pytest.fixture(autouse=True)
def local_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_builtin_digits_splits_shapes_and_normalisation(digits):
    s = digits
    assert s.num_classes == 10 and s.class_names == [str(d) for d in range(10)]
    assert len(s.train) + len(s.holdout) + len(s.test) == 1797
    assert len(s.test) == 359 and len(s.holdout) == round(0.1 * (1797 - 359))
    for ds in (s.train, s.holdout, s.test):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated
    x = torch.stack([s.test[i][0] for i in range(len(s.test))])
    assert abs(x.mean()) < 0.2 and 0.8 < x.std() < 1.2  # normalised with the train statistics


def test_holdout_disjoint_stratified_and_seeded(digits):
    train = set(digits.train.source_indices.tolist())
    hold = set(digits.holdout.source_indices.tolist())
    assert not train & hold and len(train | hold) == 1797 - 359
    counts = torch.bincount(digits.holdout.labels, minlength=10)
    assert counts.min() >= 12 and counts.max() <= 16  # ~14.4 per class
    again = load_splits(**data_arguments(DataConfig(label_noise=0.3)), seed=0)
    other = load_splits(**data_arguments(DataConfig()), seed=1)
    assert torch.equal(again.holdout.source_indices, digits.holdout.source_indices)
    assert not torch.equal(other.holdout.source_indices, digits.holdout.source_indices)
    for i in (0, 7, 100):
        assert torch.equal(again.train[i][0], digits.train[i][0])
        assert torch.equal(again.test[i][0], digits.test[i][0])


def test_max_train_examples_is_a_seeded_class_balanced_subset_outside_the_holdout():
    a = load_splits(**data_arguments(DataConfig(max_train_examples=100)), seed=3)
    b = load_splits(**data_arguments(DataConfig(max_train_examples=100)), seed=3)
    assert len(a.train) == 100 and torch.equal(a.train.source_indices, b.train.source_indices)
    assert torch.bincount(a.train.labels, minlength=10).min() >= 9
    assert not set(a.train.source_indices.tolist()) & set(a.holdout.source_indices.tolist())


def test_augmentation_is_a_function_of_seed_epoch_index(digits):
    ds = digits.train
    ds.set_epoch(3)
    first = [ds[i] for i in range(8)]
    torch.manual_seed(123)  # the global RNG plays no part
    ds.set_epoch(4)
    other = [ds[i] for i in range(8)]
    ds.set_epoch(3)
    again = [ds[i] for i in range(8)]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # hold-out and test carry no augmentation: no epoch to select, the same tensor whatever the
    # global RNG
    for split in (digits.holdout, digits.test):
        assert not hasattr(split, "set_epoch")
        torch.manual_seed(0)
        image = split[0][0]
        torch.manual_seed(1)
        assert torch.equal(split[0][0], image)


def test_worker_count_does_not_change_batches(digits):
    ds = digits.train
    ds.set_epoch(2)
    batches = [next(iter(DataLoader(ds, batch_size=16, num_workers=w))) for w in (0, 2)]
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])


def test_label_noise_redraws_a_fixed_share_of_labels_each_epoch(digits):
    ds = digits.train
    n = len(ds)
    assert len(ds.noisy_indices) == round(0.3 * n)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[ds.noisy_indices] = True
    epochs = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        labels = ds.epoch_labels()
        assert torch.equal(labels[~noisy], ds.labels[~noisy])  # clean examples never change
        wrong = (labels != ds.labels).float()[noisy].mean()
        assert 0.8 < wrong < 0.98  # redrawn uniformly: 9/10 wrong on average
        epochs.append(labels)
    assert (epochs[0] != epochs[1]).any()
    ds.set_epoch(1)
    some = ds.noisy_indices[:5]
    assert [ds[i][1] for i in some.tolist()] == epochs[1][some].tolist()
    same = load_splits(**data_arguments(DataConfig(label_noise=0.3)), seed=0).train
    assert torch.equal(same.noisy_indices, ds.noisy_indices)
    clean = load_splits(**data_arguments(DataConfig()), seed=0)
    assert len(clean.train.noisy_indices) == 0 and torch.equal(clean.train.epoch_labels(),
                                                               clean.train.labels)


def test_corrupted_examples_are_fixed_for_all_runs():
    """Paper 000: the partition into corrupted and clean examples is the same in every run."""
    runs = [load_splits(**data_arguments(DataConfig(label_noise=0.3)), seed=seed).train
            for seed in (0, 1)]
    corrupted = [set(r.source_indices[r.noisy_indices].tolist()) for r in runs]
    assert all(len(c) == round(0.3 * len(r)) for c, r in zip(corrupted, runs))
    # the seeds carve different hold-out splits; on the examples both train on, the partition
    # agrees up to the count each run takes
    both = set(runs[0].source_indices.tolist()) & set(runs[1].source_indices.tolist())
    disagree = (corrupted[0] ^ corrupted[1]) & both
    assert len(disagree) <= 0.02 * len(both)
    keep = torch.arange(1000)
    assert torch.equal(corrupted_examples(1000, keep, 0.3), corrupted_examples(1000, keep, 0.3))
    low = corrupted_examples(1000, keep, 0.2)  # a lower level corrupts a subset of a higher one
    assert int(low.sum()) == 200 and bool((corrupted_examples(1000, keep, 0.4) | ~low).all())


def test_lowres_digits_are_4x4_with_a_large_test_split():
    s = load_splits(**data_arguments(DataConfig(source=BUILTIN_DIGITS_LOWRES, image_size=4,
                                                augment=False)), seed=0)
    assert len(s.test) == 1097 and len(s.train) + len(s.holdout) == 700
    assert torch.bincount(s.test.labels, minlength=10).min() >= 100
    full = load_splits(**data_arguments(DataConfig(image_size=8, augment=False)), seed=0)
    assert s.test.image(0).shape == (3, 4, 4) and full.test.image(0).shape == (3, 8, 8)


def test_views_are_augmented_copies_and_a_subset_keeps_its_examples(digits):
    cfg = DataConfig(max_train_examples=50)
    one, two = load_splits(**data_arguments(cfg), seed=0), load_splits(**data_arguments(cfg), seed=0, views=2)
    x, _ = two.train[5]
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x[0], one.train[5][0]) and not torch.equal(x[0], x[1])
    sub = one.train.subset([5, 9])
    assert len(sub) == 2 and torch.equal(sub[0][0], one.train[5][0])


def test_without_augment_training_images_do_not_change_with_the_epoch(digits):
    s = load_splits(**data_arguments(DataConfig(augment=False, max_train_examples=20)), seed=0)
    s.train.set_epoch(0)
    a = s.train[0][0]
    s.train.set_epoch(1)
    assert torch.equal(a, s.train[0][0])


def _images(n, seed=0, size=(12, 10)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def test_save_to_disk_directory(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.Value("int64")})
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": _images(30), "fine": [i % 3 for i in range(30)]},
                                         features),
        test=datasets.Dataset.from_dict({"img": _images(6, 1), "fine": [0, 1, 2] * 2}, features))
    dd.save_to_disk(tmp_path / "dd")
    cfg = DataConfig(source=str(tmp_path / "dd"), image_column="img", label_column="fine",
                     image_size=16, holdout_fraction=0.2)
    s = load_splits(**data_arguments(cfg), seed=0)
    assert (len(s.train), len(s.holdout), len(s.test), s.num_classes) == (24, 6, 6, 3)
    assert s.train[0][0].shape == (3, 16, 16)
    with pytest.raises(UserError, match="columns: img, fine"):
        load_splits(**data_arguments(dataclasses.replace(cfg, label_column="label")), seed=0)
    with pytest.raises(UserError, match="splits: train, test"):
        load_splits(**data_arguments(dataclasses.replace(cfg, holdout_split="validation")), seed=0)

    # a single Dataset with string labels: exposed as split "train"
    single = datasets.Dataset.from_dict({"image": _images(8), "label": ["b", "a"] * 4})
    single.save_to_disk(tmp_path / "single")
    cfg = DataConfig(source=str(tmp_path / "single"), test_split="train", holdout_split=None)
    with pytest.raises(UserError, match="also data.train_split"):
        load_splits(**data_arguments(cfg), seed=0)
    with pytest.raises(UserError, match="splits: train"):
        load_splits(**data_arguments(dataclasses.replace(cfg, test_split="test")), seed=0)


def test_imagefolder_directory(tmp_path):
    for split, n in (("train", 10), ("test", 3)):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / "folder" / split / name
            folder.mkdir(parents=True)
            for i, image in enumerate(_images(n, seed=c)):
                image.save(folder / f"{i}.png")
    s = load_splits(**data_arguments(DataConfig(source=str(tmp_path / "folder"), image_size=8)), seed=0)
    assert s.class_names == ["cat", "dog"] and s.num_classes == 2
    assert (len(s.train), len(s.holdout), len(s.test)) == (18, 2, 6)
    assert sorted(s.holdout.labels.tolist()) == [0, 1]
    assert s.test[0][0].shape == (3, 8, 8)


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such directory.*valid: builtin:digits"):
        load_splits(**data_arguments(DataConfig(source=str(tmp_path / "nope"))), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a save_to_disk dataset"):
        load_splits(**data_arguments(DataConfig(source=str(tmp_path / "empty"))), seed=0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_splits(**data_arguments(DataConfig(source=str(tmp_path / "file.txt"))), seed=0)
    with pytest.raises(UserError, match="unknown built-in"):
        load_splits(**data_arguments(DataConfig(source="builtin:mnist")), seed=0)
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not be loaded from the hub") as e:
        load_splits(**data_arguments(DataConfig(source="no-such-owner/no-such-dataset")), seed=0)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="data.image_column 'pixels'.*columns: image, label"):
        load_splits(**data_arguments(DataConfig(image_column="pixels")), seed=0)
    with pytest.raises(UserError, match="data.test_split 'validation'.*splits: train, test"):
        load_splits(**data_arguments(DataConfig(test_split="validation")), seed=0)
