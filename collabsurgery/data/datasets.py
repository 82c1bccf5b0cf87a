"""Datasets, splits, label noise and deterministic augmentation.

Sources (``data.source``): ``builtin:digits`` (scikit-learn's 8x8 handwritten digits, shipped
with the package, no network), ``builtin:digits-lowres`` (the same digits at 4x4 with 1,097
test images: the studies' unsaturated small budget), a directory written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, an ``imagefolder`` directory (``<dir>/<split>/<class>/<img>`` or
``<dir>/<class>/<img>``), or a Hugging Face hub id.

Images are converted to RGB, resized so the shorter side is ``image_size`` (bilinear) and
centre-cropped to a square, then normalised per channel with the mean/std of the training split
(estimated on up to 2048 un-augmented training images, picked with a fixed generator); they are
returned in :class:`Splits` so inference can reuse them.

Every random choice of the training view (crop offsets, flips, noisy labels; the set of
corrupted examples is fixed for all runs, see :func:`corrupted_examples`) comes from a
``torch.Generator`` seeded by a hash of ``(seed, epoch, example)``, never from the global RNG:
a sample depends only on those three numbers, not on the worker count, the batch order or where
a run resumed. Call ``train.set_epoch(epoch)`` before each epoch; with DataLoader workers keep
``persistent_workers=False`` so the workers see the new epoch.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from collabsurgery.common.seeding import generator
from collabsurgery.errors import UserError

__all__ = ["BUILTIN_DIGITS", "BUILTIN_DIGITS_LOWRES", "ImageDataset", "Splits", "TrainDataset",
           "corrupted_examples", "load_splits"]

BUILTIN_DIGITS = "builtin:digits"
BUILTIN_DIGITS_LOWRES = "builtin:digits-lowres"
_VALID_SOURCES = ("valid: builtin:digits, builtin:digits-lowres, a save_to_disk directory, an "
                  "imagefolder directory, or a hub id")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_STATS_SAMPLE = 2048
_CACHE_BYTES = 256 * 2**20  # splits whose resized uint8 images fit are decoded once, up front


def _stratified_pick(labels: Tensor, k: int, *key: Any) -> Tensor:
    """``k`` sorted indices, spread over the classes in proportion (+-1), random within a class."""
    n = len(labels)
    perm = torch.randperm(n, generator=generator("pick", *key))
    grouped = perm[torch.argsort(labels[perm], stable=True)]  # by class, shuffled within class
    positions = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long()
    return grouped[positions].sort().values


def _to_uint8(image: Any, size: int) -> Tensor:
    """RGB uint8 ``[3, size, size]``: shorter side resized to ``size`` (bilinear), centre crop."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Evaluation view (hold-out, test): yields ``(FloatTensor[3, S, S] normalised, int label)``.

    ``source_indices[i]`` is the position of example ``i`` in the split it was taken from.
    """

    def __init__(self, hf: datasets.Dataset, image_column: str, labels: Tensor, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...],
                 source_indices: Tensor | None = None):
        self.hf = hf.select_columns([image_column])
        self.source_indices = (torch.arange(len(labels)) if source_indices is None
                               else source_indices)
        self.image_column = image_column
        self.labels = labels
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.cached: Tensor | None = None  # uint8 [N, 3, S, S], see cache()

    def cache(self, max_bytes: int = _CACHE_BYTES) -> bool:
        """Decode and resize every image once if they fit in ``max_bytes``; returns whether."""
        if self.cached is None and len(self.hf) * 3 * self.image_size ** 2 <= max_bytes:
            self.cached = torch.stack([self._decode(i) for i in range(len(self.hf))])
        return self.cached is not None

    def _decode(self, i: int) -> Tensor:
        """Row ``i``'s image as uint8 ``[3, S, S]``; a file that cannot be decoded is a
        UserError naming it."""
        try:
            return _to_uint8(self.hf[i][self.image_column], self.image_size)
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for a bad file
            raw = self.hf.cast_column(self.image_column, datasets.Image(decode=False))[i]
            name = (raw[self.image_column] or {}).get("path") or f"row {i}"
            raise UserError(f"image {name} cannot be decoded ({type(err).__name__}: "
                            f"{_first_line(err)}); remove or replace it") from None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Tensor:
        """Example ``i`` resized, as floats in [0, 1], not normalised."""
        if self.cached is not None:
            return self.cached[int(i)].float() / 255
        return self._decode(int(i)).float() / 255

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return (self.image(i) - self.mean) / self.std, int(self.labels[i])


class TrainDataset(ImageDataset):
    """Training view: seeded random crop (zero padding ``image_size // 8``) + horizontal flip, and
    label noise, all a function of ``(seed, epoch, example)``.

    ``noisy_indices``: the examples whose labels are redrawn uniformly over the classes every
    epoch (``noisy``, a mask over the examples; :func:`load_splits` fixes it for all runs). ``views > 1`` returns ``[views, 3, S, S]``, each view from its
    own generator (view 0 equals the single-view sample). Indices in ``noisy_indices`` and the
    generator keys refer to the full training split, also inside a :meth:`subset`.
    """

    def __init__(self, hf: datasets.Dataset, image_column: str, labels: Tensor, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...],
                 source_indices: Tensor | None = None, *, num_classes: int, seed: int,
                 augment: bool = True, hflip: bool = True, noisy: Tensor | None = None,
                 views: int = 1):
        super().__init__(hf, image_column, labels, image_size, mean, std, source_indices)
        if views < 1:
            raise UserError(f"views must be >= 1, got {views}")
        self.num_classes, self.seed, self.views = num_classes, int(seed), views
        self.augment, self.hflip = augment, hflip
        self.pad = max(1, image_size // 8)
        self.epoch = 0
        self.rows = torch.arange(len(labels))
        self._noisy = torch.zeros(len(labels), dtype=torch.bool) if noisy is None else noisy
        self.noisy_indices = self._noisy.nonzero().flatten()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation and noisy labels ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def subset(self, indices: Tensor | list[int]) -> TrainDataset:
        """A view on some examples (e.g. one student's share) with the same per-example draws."""
        sub = copy.copy(self)
        sub.rows = self.rows[torch.as_tensor(indices, dtype=torch.long)]
        return sub

    def __len__(self) -> int:
        return len(self.rows)

    def _label(self, row: int) -> int:
        if self._noisy[row]:
            g = generator("label", self.seed, self.epoch, row)
            return int(torch.randint(self.num_classes, (), generator=g))
        return int(self.labels[row])

    def epoch_labels(self) -> Tensor:
        """The (possibly noisy) labels of every example of this view for the current epoch."""
        return torch.tensor([self._label(int(r)) for r in self.rows], dtype=torch.long)

    def _augment(self, x: Tensor, view: int, row: int) -> Tensor:
        if self.augment:
            g = generator("view", self.seed, self.epoch, row, view)
            p, s = self.pad, self.image_size
            dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
            x = F.pad(x, (p, p, p, p))[:, dy: dy + s, dx: dx + s]
            flip = bool(torch.rand((), generator=g) < 0.5)  # drawn either way: a stable stream
            if self.hflip and flip:
                x = x.flip(-1)
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        row = int(self.rows[i])
        x = self.image(row)
        if self.views == 1:
            return self._augment(x, 0, row), self._label(row)
        return torch.stack([self._augment(x, v, row) for v in range(self.views)]), self._label(row)


@dataclass
class Splits:
    """What :func:`load_splits` returns; ``mean``/``std`` are the normalisation constants."""

    train: TrainDataset
    holdout: ImageDataset
    test: ImageDataset
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# ---------------------------------------------------------------------------- sources

def corrupted_examples(n: int, keep: Tensor, label_noise: float) -> Tensor:
    """Which of a run's training examples get noisy labels: a mask over ``keep`` (its examples'
    indices in the source's training split of ``n``).

    Paper 000's protocol: "the partition for images with corruption or not is fixed for all
    runs". A fixed order over the source's training split (not keyed by the run's seed) ranks
    every example; a run corrupts the first ``round(label_noise * len(keep))`` of its own
    examples in that order. Runs with the same training examples corrupt the same ones whatever
    their seed; runs whose seeds carve different hold-out splits share all the corrupted
    examples they both train on, up to the count.
    """
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.randperm(n, generator=generator("noisy-set"))] = torch.arange(n)
    first = torch.argsort(rank[keep])[: round(label_noise * len(keep))]
    noisy = torch.zeros(len(keep), dtype=torch.bool)
    noisy[first] = True
    return noisy


@functools.lru_cache(maxsize=2)
def _digits(lowres: bool = False) -> datasets.DatasetDict:
    """scikit-learn's digits as a DatasetDict with a fixed stratified train/test split: 80/20,
    or for ``lowres`` (``builtin:digits-lowres``) each image area-downsampled to 4x4 (the mean
    of each 2x2 block) and 1,097 test images, leaving 700 for training and hold-out."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = raw.images
    if lowres:
        images = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4))
    pixels = np.rint(images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": raw.target.tolist()}, features)
    labels = torch.as_tensor(raw.target)
    n_test = len(labels) - 700 if lowres else round(0.2 * len(labels))
    test = _stratified_pick(labels, n_test, "digits-test")
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test] = True
    return datasets.DatasetDict(train=ds.select((~is_test).nonzero().flatten().tolist()),
                                test=ds.select(test.tolist()))


def _load_directory(path: Path, source: str) -> datasets.DatasetDict:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _as_dict(datasets.load_from_disk(str(path)))
    if any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.rglob("*")):
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    raise UserError(f"data.source '{source}': directory holds neither a save_to_disk dataset "
                    f"(dataset_dict.json or state.json) nor images; {_VALID_SOURCES}")


def _load_source(source: str) -> datasets.DatasetDict:
    if source in (BUILTIN_DIGITS, BUILTIN_DIGITS_LOWRES):
        return _digits(lowres=source == BUILTIN_DIGITS_LOWRES)
    if source.startswith("builtin:"):
        raise UserError(f"data.source '{source}': unknown built-in dataset; {_VALID_SOURCES}")
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            return _load_directory(path, source)
        except UserError:
            raise
        except Exception as e:  # a corrupt directory: report it as the user's data, one line
            raise UserError(f"data.source '{source}': could not load the directory "
                            f"({type(e).__name__}: {_first_line(e)}); {_VALID_SOURCES}") from e
    if path.exists():
        raise UserError(f"data.source '{source}' is a file, not a directory; {_VALID_SOURCES}")
    if path.is_absolute() or source.startswith((".", "~")):
        raise UserError(f"data.source '{source}': no such directory; {_VALID_SOURCES}")
    try:
        loaded = datasets.load_dataset(source)
    except Exception as e:  # offline, unknown id, gated, ...: all one user-facing failure
        raise UserError(f"data.source '{source}': not a directory and could not be loaded from "
                        f"the hub ({type(e).__name__}: {_first_line(e)}); {_VALID_SOURCES}") from e
    return _as_dict(loaded)


def _as_dict(loaded: datasets.Dataset | datasets.DatasetDict) -> datasets.DatasetDict:
    """A lone Dataset becomes the split "train"."""
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    return datasets.DatasetDict(train=loaded)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# ---------------------------------------------------------------------------- splits

def _encode_labels(parts: dict[str, datasets.Dataset], column: str,
                   source: str) -> tuple[dict[str, Tensor], list[str]]:
    """Integer labels per split and the class names (ClassLabel names, or from the values)."""
    values = {name: list(ds[column]) for name, ds in parts.items()}
    feature = next(iter(parts.values())).features[column]
    everything = [v for vs in values.values() for v in vs]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in everything):
        names = [str(c) for c in range(max(everything, default=-1) + 1)]
    elif all(isinstance(v, str) for v in everything):
        names = sorted(set(everything))
        index = {name: c for c, name in enumerate(names)}
        values = {split: [index[v] for v in vs] for split, vs in values.items()}
    else:
        raise UserError(f"data.label_column '{column}' of '{source}' must hold class indices or "
                        f"class names, got {feature}")
    labels = {split: torch.tensor(vs, dtype=torch.long) for split, vs in values.items()}
    for split, y in labels.items():
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise UserError(f"data.label_column '{column}' of split '{split}' holds labels outside "
                            f"0..{len(names) - 1} (unlabelled split?)")
    return labels, names


def _channel_stats(ds: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    n = len(ds)
    rows = torch.randperm(n, generator=generator("stats"))[:_STATS_SAMPLE].tolist()
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for r in rows:
        x = ds.image(r).double().flatten(1)
        total += x.sum(1)
        squares += (x * x).sum(1)
    count = len(rows) * ds.image_size ** 2
    mean = total / count
    std = (squares / count - mean ** 2).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channel: leave it alone
    return tuple(mean.tolist()), tuple(std.tolist())


def load_splits(source: str = BUILTIN_DIGITS, seed: int = 0, *, image_column: str = "image",
                label_column: str = "label", train_split: str = "train", test_split: str = "test",
                holdout_split: str | None = None, holdout_fraction: float = 0.1,
                image_size: int = 32, augment: bool = True, hflip: bool = False,
                label_noise: float = 0.0, max_train_examples: int | None = None,
                views: int = 1) -> Splits:
    """Load ``source`` into train (augmented, noisy), hold-out and test datasets.

    The hold-out split is ``holdout_split`` or, when that is None, a stratified
    ``holdout_fraction`` of the training split chosen by ``seed``. ``max_train_examples`` then
    keeps a stratified, seeded subset of what remains for training. ``views`` is the number of
    augmented views per training example (``> 1``: ``[views, 3, S, S]`` tensors).
    """
    dd = _load_source(source)
    wanted = {"train_split": train_split, "test_split": test_split}
    if holdout_split is not None:
        wanted["holdout_split"] = holdout_split
    for key, split in wanted.items():
        if split not in dd:
            raise UserError(f"data.{key} '{split}' is not a split of '{source}'; "
                            f"splits: {', '.join(dd)}")
    for key in ("test_split", "holdout_split"):
        if wanted.get(key) == train_split:
            raise UserError(f"data.{key} '{train_split}' is also data.train_split; "
                            f"give a different split (or holdout_split: null to carve one)")
    parts = {split: dd[split] for split in wanted.values()}
    for split, ds in parts.items():
        for key, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in ds.column_names:
                raise UserError(f"data.{key} '{column}' is not a column of split '{split}' of "
                                f"'{source}'; columns: {', '.join(ds.column_names)}")
        if len(ds) == 0:
            raise UserError(f"split '{split}' of '{source}' is empty")
    labels, class_names = _encode_labels(parts, label_column, source)

    train_hf, train_y = parts[train_split], labels[train_split]
    if holdout_split is not None:
        hold_hf, hold_y = parts[holdout_split], labels[holdout_split]
        hold = torch.arange(len(hold_y))
        keep = torch.arange(len(train_y))
    else:
        n = len(train_y)
        n_hold = max(1, round(holdout_fraction * n))
        if n_hold >= n:
            raise UserError(f"data.holdout_fraction {holdout_fraction} leaves no training "
                            f"examples out of {n}; use a smaller fraction or a holdout_split")
        hold = _stratified_pick(train_y, n_hold, "holdout", seed)
        is_hold = torch.zeros(n, dtype=torch.bool)
        is_hold[hold] = True
        hold_hf, hold_y = train_hf.select(hold.tolist()), train_y[hold]
        keep = (~is_hold).nonzero().flatten()
    if max_train_examples is not None and max_train_examples < len(keep):
        keep = keep[_stratified_pick(train_y[keep], max_train_examples, "subset", seed)]
    noisy = corrupted_examples(len(train_y), keep, label_noise)
    train_hf, train_y = train_hf.select(keep.tolist()), train_y[keep]

    size, column = image_size, image_column
    try:
        _to_uint8(train_hf[0][column], size)
    except (TypeError, ValueError, OSError) as e:
        raise UserError(f"data.image_column '{column}' of '{source}' does not hold images "
                        f"({type(e).__name__}: {_first_line(e)})") from e
    raw = ImageDataset(train_hf, column, train_y, size, (0.0,) * 3, (1.0,) * 3)
    raw.cache()
    mean, std = _channel_stats(raw)
    train = TrainDataset(train_hf, column, train_y, size, mean, std, keep,
                         num_classes=len(class_names), seed=seed, augment=augment,
                         hflip=hflip, noisy=noisy, views=views)
    train.cached = raw.cached
    holdout = ImageDataset(hold_hf, column, hold_y, size, mean, std, hold)
    test = ImageDataset(parts[test_split], column, labels[test_split], size, mean, std)
    holdout.cache()
    test.cache()
    return Splits(train=train, holdout=holdout, test=test, num_classes=len(class_names),
                  class_names=class_names, mean=mean, std=std)
