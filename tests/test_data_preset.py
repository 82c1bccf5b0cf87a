"""data.preset: the small pipeline unchanged bit for bit (and Cutout), preset timm giving exactly
timm's own transforms for the same draws, the epoch reaching DataLoader workers (persistent
ones too), and bad data keys as one line."""
from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm.data
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from PIL import Image

from collabsurgery import cli
from collabsurgery.common.seeding import derive_seed, generator
from collabsurgery.config.recipe import DataConfig, data_arguments, load_recipe, save_recipe
from collabsurgery.data.batches import SharedBatches, SubsetBatches
from collabsurgery.data.datasets import load_splits
from collabsurgery.errors import UserError

from helpers import assert_same_weights, latest_weights, stop_then_resume, tiny_recipe

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module", autouse=True)
def local_hf_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE",
                   str(tmp_path_factory.mktemp("hf_cache")))
        datasets.disable_progress_bars()
        yield


def make_imagefolder(root: Path, n: int = 40, classes: int = 2, test: int = 8,
                     sizes: tuple[int, int] = (24, 72)) -> Path:
    """``n`` JPEGs of varied sizes and aspect ratios in ``root/{train,test}/<class>/``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "test" if i < test else "train"
        folder = root / split / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(*sizes, size=2)
        base = rng.integers(0, 255, (3,), dtype=np.uint8)
        noise = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        Image.fromarray(base + noise).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("jpegs"))


def path_of(ds, row: int) -> str:
    return ds.hf.cast_column(ds.image_column, datasets.Image(decode=False))[row][
        ds.image_column]["path"]


def seed_like_the_dataset(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def accelerator() -> Accelerator:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=5))


# ---------------------------------------------------------------------------- preset small

#: sha256 (16 hex digits) of the small pipeline's outputs, captured before data.preset existed:
#: (epoch, example, image hash, label) of the training view, then 5 hold-out and 5 test images
SMALL_REFERENCE = {
    "plain": (dict(image_size=16, hflip=True, max_train_examples=200),
              [(0, 0, "539705d809250a99", 6), (0, 7, "02dee189288b2b38", 1),
               (0, 150, "600e59d45fbb804b", 9), (2, 0, "b358ade2f369a806", 6),
               (2, 7, "cce473119ed51abe", 1), (2, 150, "91cf3189083a39f4", 9)],
              "6602e3458175e0e4", "54f4907e2156d2b4"),
    "views_noise": (dict(image_size=12, hflip=True, views=2, label_noise=0.3,
                         max_train_examples=200, seed=3),
                    [(0, 0, "341f37214521e842", 0), (0, 7, "5d1340c91c3552a2", 2),
                     (0, 150, "08ac27c32888aab7", 8), (2, 0, "553b2f7f1fed39d5", 0),
                     (2, 7, "f4a5232cfbea5870", 2), (2, 150, "b23c7975aafb7309", 8)],
                    "dcf4151f8925fb37", "16d6cedbe15b9fd0"),
    "noaug": (dict(image_size=16, augment=False, max_train_examples=200),
              [(0, 0, "f884cee5705c6ded", 6), (2, 150, "902548c0851a7322", 9)],
              "6602e3458175e0e4", "54f4907e2156d2b4"),
}


@pytest.mark.parametrize("case", SMALL_REFERENCE)
def test_small_preset_is_unchanged_bit_for_bit(case):
    kwargs, samples, holdout, test = SMALL_REFERENCE[case]
    s = load_splits(**kwargs)
    assert s.settings == {} and type(s.train).__name__ == "TrainDataset"
    for epoch, i, expected, label in samples:
        s.train.set_epoch(epoch)
        x, y = s.train[i]
        assert (digest(x), y) == (expected, label)
        assert torch.equal(s.train[(epoch, i)][0], x)  # the epoch carried by the index
    assert digest(torch.stack([s.holdout[i][0] for i in range(5)])) == holdout
    assert digest(torch.stack([s.test[i][0] for i in range(5)])) == test


def old_small_view(ds, row: int, epoch: int, view: int) -> torch.Tensor:
    """The small preset's training view as it was written before data.preset (a transcription,
    platform-independent beside the hashes above)."""
    x = ds.image(row)
    g = generator("view", ds.seed, epoch, row, view)
    p, s = ds.pad, ds.image_size
    dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
    x = F.pad(x, (p, p, p, p))[:, dy: dy + s, dx: dx + s]
    if ds.hflip and bool(torch.rand((), generator=g) < 0.5):
        x = x.flip(-1)
    return (x - ds.mean) / ds.std


def test_small_preset_matches_the_old_code_path():
    s = load_splits(image_size=16, hflip=True, max_train_examples=100, views=2)
    for epoch in (0, 3):
        for i in (0, 5, 99):
            row = int(s.train.rows[i])
            x, _ = s.train[(epoch, i)]
            for v in range(2):
                assert torch.equal(x[v], old_small_view(s.train, row, epoch, v))


#: the batch streams of the providers (Accelerate's seedable sampler, data_seed 5), captured
#: before the samplers carried the epoch: (epoch or "skip2", batches, images hash, labels hash)
STREAM_REFERENCE = {
    "shared": [(0, 7, "f2a23e88b3663228", "a5ba371165dd2879"),
               (1, 7, "599e6b49c0fe9433", "a4c44ccb7d70e4c4"),
               ("skip2", 5, "0457af98d7817290", "91240dd591e33598")],
    "subsets": [(0, 6, "79b09a51193f3b11", "bbc4dcfc44f797fe"),
                (1, 6, "05911187f1ec1194", "72fa1dbdecc6d426"),
                ("skip2", 4, "097dfe9c9bbe660e", "0def64ee8d8b7973")],
}


def stream(provider, epoch, skip=0):
    provider.set_epoch(epoch)
    got = list(provider.batches(skip))
    return (len(got), digest(torch.cat([x.flatten() for x, _ in got])),
            digest(torch.cat([y.flatten() for _, y in got])))


@pytest.mark.parametrize("kind", STREAM_REFERENCE)
def test_batch_order_is_unchanged(kind):
    s = load_splits(image_size=12, hflip=True, max_train_examples=120, label_noise=0.3, seed=5)
    provider = (SharedBatches(s.train, 16) if kind == "shared"
                else SubsetBatches(s.train, 3, 8, 0.2, seed=5))
    provider.prepare(accelerator())
    (_, *e0), (_, *e1), (_, *skip) = STREAM_REFERENCE[kind]
    assert list(stream(provider, 0)) == e0 and list(stream(provider, 1)) == e1
    assert list(stream(provider, 1, skip=2)) == skip


def test_cutout_is_one_seeded_square_of_zeros():
    plain = load_splits(image_size=32, hflip=True, max_train_examples=60)
    cut = load_splits(image_size=32, hflip=True, max_train_examples=60, cutout=8)
    sizes = set()
    for epoch in (0, 1):
        for i in range(40):
            x, y = cut.train[(epoch, i)]
            ref, ref_y = plain.train[(epoch, i)]
            assert y == ref_y and torch.equal(cut.train[(epoch, i)][0], x)  # seeded
            changed = (x != ref).any(0)
            assert torch.equal(x[:, changed], torch.zeros_like(x[:, changed]))
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            if len(rows):  # a rectangle (a clipped square) of at most 8 x 8
                assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
                sizes.add((len(rows), len(cols)))
                assert len(rows) <= 8 and len(cols) <= 8
    assert (8, 8) in sizes and any(s != (8, 8) for s in sizes)  # whole, and over the border
    # another epoch, another patch; no augment, no cutout
    assert not torch.equal(cut.train[(0, 3)][0], cut.train[(1, 3)][0])
    still = load_splits(image_size=32, max_train_examples=60, cutout=8, augment=False)
    assert torch.equal(still.train[(0, 3)][0], still.train[(1, 3)][0])


# ---------------------------------------------------------------------------- preset timm

TIMM_SETTINGS = [
    dict(hflip=True, auto_augment="rand-m9-mstd0.5", reprob=0.5),
    dict(hflip=True, color_jitter=0.4, scale=[0.35, 1.0], ratio=[0.5, 2.0],
         interpolation="random"),
    dict(auto_augment="augmix-m5-w4-d2", color_jitter=None),
]


@pytest.mark.parametrize("settings", TIMM_SETTINGS)
def test_timm_train_views_are_timms_own_transform(folder, settings):
    s = load_splits(str(folder), seed=4, preset="timm", image_size=None, model="cifar_resnet20",
                    views=2, **settings)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("cifar_resnet20"))
    assert s.settings == {"image_size": 32, "test_image_size": 32,
                          "interpolation": settings.get("interpolation", cfg["interpolation"]),
                          "crop_pct": cfg["crop_pct"], "mean": list(cfg["mean"]),
                          "std": list(cfg["std"])}
    timms = timm.data.create_transform(
        32, is_training=True, scale=settings.get("scale", (0.08, 1.0)),
        ratio=settings.get("ratio", (3 / 4, 4 / 3)), hflip=0.5 if settings.get("hflip") else 0,
        color_jitter=settings.get("color_jitter", 0.4), auto_augment=settings.get("auto_augment"),
        interpolation=settings.get("interpolation", cfg["interpolation"]), mean=cfg["mean"],
        std=cfg["std"], re_prob=settings.get("reprob", 0.0))
    for epoch in (0, 2):
        for i in (0, 3, len(s.train) - 1):
            row = int(s.train.rows[i])
            image = Image.open(path_of(s.train, row)).convert("RGB")
            x, _ = s.train[(epoch, i)]
            assert x.shape == (2, 3, 32, 32)
            for view in range(2):
                seed_like_the_dataset(derive_seed("view", 4, epoch, row, view))
                assert torch.equal(x[view], timms(image))
    assert not torch.equal(s.train[(0, 0)][0], s.train[(1, 0)][0])


def test_timm_eval_is_timms_own_transform_cached_or_not(folder):
    s = load_splits(str(folder), preset="timm", image_size=24, test_image_size=40,
                    crop_pct=0.875, interpolation="bicubic", model="resnet18",
                    mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert s.settings["test_image_size"] == 40 and s.train[(0, 0)][0].shape == (3, 24, 24)
    timms = timm.data.create_transform(40, is_training=False, interpolation="bicubic",
                                       crop_pct=0.875, mean=(0.5,) * 3, std=(0.25,) * 3)
    for split in (s.holdout, s.test):
        assert split.cached is not None
        expected = [timms(Image.open(path_of(split, i)).convert("RGB")) for i in range(len(split))]
        cached = [split[i][0] for i in range(len(split))]
        split.cached = None
        decoded = [split[i][0] for i in range(len(split))]
        for e, c, d in zip(expected, cached, decoded):
            assert e.shape == (3, 40, 40) and torch.equal(c, e) and torch.equal(d, e)


def test_timm_views_leave_the_global_rngs_alone(folder):
    s = load_splits(str(folder), preset="timm", image_size=32, model="cifar_resnet20",
                    auto_augment="rand-m9-mstd0.5", reprob=0.5, hflip=True)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = s.train[(1, 2)][0]
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    batch = s.train.__getitems__([(0, 4), (1, 2)])  # the DataLoader's batched fetch
    assert torch.equal(batch[1][0], first) and torch.equal(batch[0][0], s.train[(0, 4)][0])
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    torch.manual_seed(99)  # the global RNG's state plays no part in a view
    assert torch.equal(s.train[(1, 2)][0], first)


def epoch_batches(provider, epochs):
    """Every epoch's batches up to ``epochs``, as the engine asks for them; the last one's."""
    for epoch in range(epochs + 1):
        provider.set_epoch(epoch)
        got = list(provider.batches())
    return got


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b))


@pytest.mark.parametrize("preset", ["small", "timm"])
def test_a_sample_is_the_same_with_workers_persistent_workers_and_after_resume(folder, preset):
    def splits():
        kw = dict(preset="timm", image_size=32, model="cifar_resnet20",
                  auto_augment="rand-m9-mstd0.5", reprob=0.3) if preset == "timm" else {}
        return load_splits(str(folder), seed=2, hflip=True, label_noise=0.4, **kw)

    s = splits()
    reference = epoch_batches(_prepared(SharedBatches(s.train, 4)), 2)
    workers = _prepared(SharedBatches(s.train, 4, num_workers=2))
    assert workers.loader.persistent_workers  # one pool for every epoch
    assert same_batches(epoch_batches(workers, 2), reference)
    workers.set_epoch(2)  # epoch 2 once more, from the same persistent workers
    assert same_batches(list(workers.batches()), reference)
    # a resumed run: a fresh dataset object, straight at epoch 2, mid-epoch
    fresh = _prepared(SharedBatches(splits().train, 4, num_workers=2))
    fresh.set_epoch(2)
    assert same_batches(list(fresh.batches(2)), reference[2:])
    fresh.set_epoch(2)
    assert same_batches(list(fresh.batches()), reference)
    fresh.set_epoch(0)
    assert not same_batches(list(fresh.batches()), reference)  # the epoch matters
    # sub-set batches: persistent workers see the epoch too
    subsets = [_prepared(SubsetBatches(s.train, 2, 4, seed=2, num_workers=w)) for w in (0, 2)]
    assert same_batches(epoch_batches(subsets[1], 2), epoch_batches(subsets[0], 2))


def _prepared(provider):
    provider.prepare(accelerator())
    return provider


def test_a_model_without_a_timm_data_config_gets_timms_defaults_with_a_warning(capsys):
    s = load_splits(preset="timm", image_size=None, model="torchvision.resnet18",
                    max_train_examples=50)
    assert "has no timm data configuration" in capsys.readouterr().err
    assert s.settings == {"image_size": 224, "test_image_size": 224, "interpolation": "bicubic",
                          "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406],
                          "std": [0.229, 0.224, 0.225]}
    assert s.train[0][0].shape == (3, 224, 224)


BAD = {
    "unknown policy": (dict(preset="timm", auto_augment="rand-x9"),
                       r"'data.auto_augment' is 'rand-x9', which timm does not accept .*valid: "
                       r"RandAugment rand-m9-mstd0.5-inc1 .*augmix-m5-w4-d2.*original, "
                       r"originalr, v0, v0r, or 3a"),
    "unknown policy family": (dict(preset="timm", auto_augment="foo"), r"'data.auto_augment'"),
    "scale min > max": (dict(preset="timm", scale=[1.0, 0.08]),
                        r"'data.scale' is \[1.0, 0.08\]: its minimum exceeds its maximum"),
    "ratio min > max": (dict(preset="timm", ratio=[2.0, 0.5]), r"'data.ratio' .* minimum exceeds"),
    "zero scale": (dict(preset="timm", scale=[0.0, 1.0]), r"'data.scale' .* must be > 0"),
    "timm key with small": (dict(auto_augment="rand-m9-mstd0.5"),
                            r"'data.auto_augment' applies to data.preset=timm"),
    "scale with small": (dict(scale=[0.5, 1.0]), r"'data.scale' applies to data.preset=timm"),
    "null size with small": (dict(image_size=None), r"'data.image_size' is null"),
    "cutout with timm": (dict(preset="timm", cutout=8), r"'data.cutout' applies to .*small"),
    "no model": (dict(preset="timm", model=None, image_size=None), r"no model was given"),
    "unknown model": (dict(preset="timm", model="resnet1800"), r"unknown model 'resnet1800'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_keys_are_one_line(case):
    kwargs, match = BAD[case]
    kwargs = {"model": "cifar_resnet20", "image_size": 32, **kwargs}
    with pytest.raises(UserError) as err:
        load_splits(**kwargs)
    assert "\n" not in str(err.value) and re.search(match, str(err.value)), str(err.value)


@pytest.mark.parametrize("override,match", [
    ("data.auto_augment=rand-x9", r"'data.auto_augment' is 'rand-x9'"),
    ("data.scale=[0.9,0.1]", r"'data.scale' is \[0.9, 0.1\]"),
])
def test_bad_data_keys_through_the_cli_write_nothing(tmp_path, capsys, override, match):
    recipe = tmp_path / "r.yaml"
    save_recipe(tiny_recipe(tmp_path / "runs", "data.preset=timm"), recipe)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["train", "--recipe", str(recipe), override]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and re.search(match, line), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_recipe_keys_and_what_a_run_records(tmp_path):
    recipe = load_recipe(None, ["data.preset=timm", "data.image_size=null"])
    args = data_arguments(recipe.data)
    assert args["preset"] == "timm" and args["image_size"] is None and "prefetch_factor" not in args
    assert DataConfig().preset == "small" and DataConfig().scale == [0.08, 1.0]
    with pytest.raises(UserError, match=r"'data.scale' must be a list of 2 numbers"):
        load_recipe(None, ["data.scale=[0.5]"])


# ---------------------------------------------------------------------------- the engine

@pytest.mark.slow
def test_resume_with_randaugment_and_workers_is_bit_identical(tmp_path, capsys):
    """A run stopped mid-epoch and resumed (two persistent workers) ends with the weights of a
    straight run (no workers): timm's RandAugment views are a function of (seed, epoch,
    example, view), and the run records the resolved data settings."""
    source = make_imagefolder(tmp_path / "images", n=40, test=8, sizes=(20, 48))
    common = [f"data.source={source}", "data.preset=timm", "data.image_size=32",
              "data.auto_augment=rand-m9-mstd0.5", "data.reprob=0.25", "data.hflip=true",
              "data.max_train_examples=null", "train.batch_size=8",
              "graph.execution=loop"]  # auto times the modes: two fresh runs may choose apart
    from collabsurgery.train import engine

    engine.train(tiny_recipe(tmp_path / "straight", *common, "run.name=r"))
    straight = latest_weights(tmp_path / "straight" / "r")

    def make(*overrides):
        return tiny_recipe(tmp_path / "resumed", *common, "run.name=r", "data.num_workers=2",
                           *overrides)

    stop_then_resume(make, tmp_path / "resumed" / "r", 4, capsys)  # 3 steps an epoch
    assert_same_weights(latest_weights(tmp_path / "resumed" / "r"), straight)
    saved = load_recipe(tmp_path / "resumed" / "r" / "recipe.yaml")
    assert (saved.data.interpolation, saved.data.crop_pct) == ("bilinear", 1.0)
    assert saved.data.mean == pytest.approx([0.4914, 0.4822, 0.4465])


def test_posterize_keeping_no_bits_gives_black_instead_of_stopping_training():
    """timm's PosterizeIncreasing keeps 0 bits at the top magnitude, which Pillow 13 refuses;
    the preset's transform gives the black image older Pillow gave."""
    from collabsurgery.data.transforms import timm_pipeline

    pipeline = timm_pipeline(image_size=32, interpolation="bilinear", crop_pct=1.0,
                             mean=[0.5] * 3, std=[0.5] * 3, auto_augment="rand-m9-mstd0.5-inc1")
    ops = next(step.ops for step in pipeline.train.transforms if hasattr(step, "ops"))
    op = next(op for op in ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getpixel((0, 0)) == (0, 0, 0)
    op.magnitude = 5  # 2 bits kept: timm's own posterize
    assert op(image).getpixel((0, 0)) == (192, 64, 0)
