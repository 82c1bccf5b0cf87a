"""Datasets, splits, label noise and deterministic augmentation.

Sources (``data.source``): ``builtin:digits`` (scikit-learn's 8x8 handwritten digits, shipped
with the package, no network), ``builtin:digits-lowres`` (the same digits at 4x4 with 1,097
test images: the studies' unsaturated small budget), a directory written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, an ``imagefolder`` directory (``<dir>/<split>/<class>/<img>`` or
``<dir>/<class>/<img>``), or a Hugging Face hub id.

Two presets (``data.preset``):

- ``small`` (the default): images are converted to RGB, resized so the shorter side is
  ``image_size`` (bilinear) and centre-cropped to a square, then normalised per channel with the
  mean/std of the training split (estimated on up to 2048 un-augmented training images, picked
  with a fixed generator; ``data.mean``/``data.std`` replace them when given); they are returned
  in :class:`Splits` so inference can reuse them. Training views are pad-and-crop (zero padding
  ``image_size // 8``), an optional flip and, with ``cutout`` > 0, one square patch of
  ``cutout`` pixels set to zero after normalisation (DeVries & Taylor's Cutout: the centre is
  uniform over the image, the patch may extend beyond the border).
- ``timm``: the model's data configuration and timm's transforms (:mod:`.transforms`): for
  training, timm's ``create_transform(is_training=True)`` on the decoded PIL image
  (RandomResizedCrop, flips, colour jitter, ``auto_augment``, random erasing); for hold-out and
  test, timm's evaluation transform (resize to ``test_image_size / crop_pct``, centre crop).
  Each of image_size, interpolation, crop_pct, mean, std left null comes from the model's
  data configuration (head 0's architecture); a model without one (a torchvision model) gets
  timm's ImageNet defaults (224 px, bicubic, ImageNet mean/std, crop_pct 0.875) and a warning.

Every random choice of the training view (crop offsets, flips, cutout, timm's draws, noisy
labels; the set of corrupted examples is fixed for all runs, see :func:`corrupted_examples`) is
a function of ``(seed, epoch, example[, view])``: a ``torch.Generator`` seeded by a hash of it
(small), or the global RNGs seeded from that hash around timm's transform (timm). A sample does
not depend on the worker count, the batch order or where a run resumed. The epoch travels with
the index: ``train[(epoch, i)]`` is example ``i`` at ``epoch`` (what the batch providers'
samplers yield, so persistent DataLoader workers, which hold their own copy of the dataset, see
every epoch); ``train[i]`` uses the epoch of ``train.set_epoch(epoch)``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from collabsurgery.common.images import IMAGE_ERRORS, describe
from collabsurgery.common.seeding import derive_seed, generator
from collabsurgery.data.transforms import kept_rngs, seed_rngs, timm_pipeline
from collabsurgery.errors import UserError

__all__ = ["BUILTIN_DIGITS", "BUILTIN_DIGITS_LOWRES", "ImageDataset", "Splits",
           "TimmImageDataset", "TimmTrainDataset", "TrainDataset", "corrupted_examples",
           "load_splits"]

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


def _local_paths(hf: datasets.Dataset, column: str) -> Any:
    """The file of every row, as a pyarrow string array, when ``column`` is an Image feature
    stored as local files alone (an imagefolder): :meth:`ImageDataset._decoded` then opens them
    itself, as ``datasets.Image.decode_example`` does, without the row formatting around it (in
    DataLoader workers that cost up to a tenth of a training view, see docs/benchmarks.md).
    None otherwise (bytes in the table, a mode conversion, remote files, no Image feature)."""
    import pyarrow.compute as pc

    feature = hf.features.get(column)
    if not isinstance(feature, datasets.Image) or not feature.decode or feature.mode:
        return None
    table = hf.cast_column(column, datasets.Image(decode=False)).with_format("arrow")[:]
    storage = table.column(column).combine_chunks()
    if len(storage) == 0 or storage.null_count:
        return None
    files, content = pc.struct_field(storage, "path"), pc.struct_field(storage, "bytes")
    if files.null_count or content.null_count < len(content):
        return None
    if not Path(files[0].as_py()).is_file() or pc.any(pc.match_substring(files, "://")).as_py():
        return None
    return files


def _file_of(hf: datasets.Dataset, column: str, i: int) -> str | None:
    """The file row ``i``'s image was read from, if ``column`` is an Image feature with one."""
    if not isinstance(hf.features.get(column), datasets.Image):
        return None
    raw = hf.cast_column(column, datasets.Image(decode=False))[i][column]
    return (raw or {}).get("path")


def _open_local(path: str) -> Image.Image:
    """A local image file opened as ``datasets.Image.decode_example`` opens it (loaded, turned
    upright by its EXIF orientation)."""
    image = Image.open(path)
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def _as_rgb(image: Any) -> Image.Image:
    """A datasets image value (PIL, or an array) as an RGB PIL image."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image.convert("RGB")


def _to_uint8(image: Any, size: int) -> Tensor:
    """RGB uint8 ``[3, size, size]``: shorter side resized to ``size`` (bilinear), centre crop."""
    image = _as_rgb(image)
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
        self.paths = _local_paths(self.hf, image_column)  # imagefolder files, or None
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
        return self._decoded(i, lambda image: _to_uint8(image, self.image_size))

    def _pil(self, i: int) -> Image.Image:
        """Row ``i``'s image as an RGB PIL image (what timm's transforms take)."""
        return self._decoded(i, _as_rgb)

    def _decoded(self, i: int, then: Callable[[Any], Any]) -> Any:
        """``then`` of row ``i``'s image; PIL's errors for a bad file become a UserError
        naming it."""
        try:
            if self.paths is not None:
                return then(_open_local(self.paths[i].as_py()))
            return then(self.hf[i][self.image_column])
        except IMAGE_ERRORS as err:  # truncated, not an image, a decompression bomb, ...
            name = _file_of(self.hf, self.image_column, i) or f"row {i}"
            raise UserError(f"image {name} cannot be decoded ({describe(err)}); remove or "
                            "replace it") from None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Tensor:
        """Example ``i`` resized, as floats in [0, 1], not normalised."""
        if self.cached is not None:
            return self.cached[int(i)].float() / 255
        return self._decode(int(i)).float() / 255

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return (self.image(i) - self.mean) / self.std, int(self.labels[i])


class TimmImageDataset(ImageDataset):
    """Evaluation view of preset timm: timm's evaluation ``transform`` (resize by crop_pct,
    centre crop, to tensor, normalise) of each image. Its deterministic PIL part (everything
    before the tensor conversion) is what :meth:`cache` keeps, as uint8."""

    def __init__(self, hf: datasets.Dataset, image_column: str, labels: Tensor, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...],
                 source_indices: Tensor | None = None, *, transform: Any):
        super().__init__(hf, image_column, labels, image_size, mean, std, source_indices)
        from timm.data.transforms import MaybeToTensor
        from torchvision.transforms import Compose

        steps = list(transform.transforms)
        cut = next((k for k, t in enumerate(steps) if isinstance(t, MaybeToTensor)), None)
        self.transform = transform
        self.fixed = Compose(steps[:cut]) if cut is not None else None  # PIL -> PIL, no draws
        self.tail = Compose(steps[cut:]) if cut is not None else None  # to tensor, normalise

    def cache(self, max_bytes: int = _CACHE_BYTES) -> bool:
        """Keep the resized, centre-cropped uint8 images if they fit in ``max_bytes``."""
        if (self.cached is None and self.fixed is not None
                and len(self.hf) * 3 * self.image_size ** 2 <= max_bytes):
            self.cached = torch.stack([torch.from_numpy(np.array(self.fixed(self._pil(i)),
                                                                 dtype=np.uint8))
                                       for i in range(len(self.hf))])
        return self.cached is not None

    def _cropped(self, i: int) -> Image.Image:
        if self.cached is not None:
            return Image.fromarray(self.cached[int(i)].numpy())
        return self.fixed(self._pil(int(i)))

    def image(self, i: int) -> Tensor:
        """Example ``i`` resized and centre-cropped, as floats in [0, 1], not normalised."""
        if self.fixed is None:
            return self.transform(self._pil(int(i))) * self.std + self.mean
        return self.tail.transforms[0](self._cropped(i))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.fixed is None:
            return self.transform(self._pil(int(i))), int(self.labels[i])
        return self.tail(self._cropped(i)), int(self.labels[i])


class TrainDataset(ImageDataset):
    """Training view: seeded random crop (zero padding ``image_size // 8``) + horizontal flip
    (+ ``cutout``), and label noise, all a function of ``(seed, epoch, example)``.

    ``noisy_indices``: the examples whose labels are redrawn uniformly over the classes every
    epoch (``noisy``, a mask over the examples; :func:`load_splits` fixes it for all runs). ``views > 1`` returns ``[views, 3, S, S]``, each view from its
    own generator (view 0 equals the single-view sample). Indices in ``noisy_indices`` and the
    generator keys refer to the full training split, also inside a :meth:`subset`.
    ``dataset[(epoch, i)]`` is example ``i`` at ``epoch``; ``dataset[i]`` at the epoch of
    :meth:`set_epoch`.
    """

    def __init__(self, hf: datasets.Dataset, image_column: str, labels: Tensor, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...],
                 source_indices: Tensor | None = None, *, num_classes: int, seed: int,
                 augment: bool = True, hflip: bool = True, noisy: Tensor | None = None,
                 views: int = 1, cutout: int = 0):
        super().__init__(hf, image_column, labels, image_size, mean, std, source_indices)
        if views < 1:
            raise UserError(f"views must be >= 1, got {views}")
        self.num_classes, self.seed, self.views = num_classes, int(seed), views
        self.augment, self.hflip, self.cutout = augment, hflip, int(cutout)
        self.pad = max(1, image_size // 8)
        self.epoch = 0
        self.rows = torch.arange(len(labels))
        self._noisy = torch.zeros(len(labels), dtype=torch.bool) if noisy is None else noisy
        self.noisy_indices = self._noisy.nonzero().flatten()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation and noisy labels ``dataset[i]`` returns."""
        self.epoch = int(epoch)

    def subset(self, indices: Tensor | list[int]) -> TrainDataset:
        """A view on some examples (e.g. one student's share) with the same per-example draws."""
        sub = copy.copy(self)
        sub.rows = self.rows[torch.as_tensor(indices, dtype=torch.long)]
        return sub

    def __len__(self) -> int:
        return len(self.rows)

    def _label(self, row: int, epoch: int | None = None) -> int:
        if self._noisy[row]:
            g = generator("label", self.seed, self.epoch if epoch is None else epoch, row)
            return int(torch.randint(self.num_classes, (), generator=g))
        return int(self.labels[row])

    def epoch_labels(self) -> Tensor:
        """The (possibly noisy) labels of every example of this view for the current epoch."""
        return torch.tensor([self._label(int(r)) for r in self.rows], dtype=torch.long)

    def _source(self, row: int) -> Any:
        """What every view of example ``row`` is drawn from: the resized image."""
        return self.image(row)

    def _view(self, x: Tensor, view: int, row: int, epoch: int) -> Tensor:
        if self.augment:
            g = generator("view", self.seed, epoch, row, view)
            p, s = self.pad, self.image_size
            dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
            x = F.pad(x, (p, p, p, p))[:, dy: dy + s, dx: dx + s]
            flip = bool(torch.rand((), generator=g) < 0.5)  # drawn either way: a stable stream
            if self.hflip and flip:
                x = x.flip(-1)
        x = (x - self.mean) / self.std
        if self.augment and self.cutout:
            x = self._cut(x, generator("cutout", self.seed, epoch, row, view))
        return x

    def _cut(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Cutout: a ``cutout`` x ``cutout`` square centred uniformly over the image (clipped
        where it extends beyond the border) set to zero, i.e. to the mean after normalising."""
        h, w = x.shape[-2:]
        cy = int(torch.randint(0, h, (), generator=g))
        cx = int(torch.randint(0, w, (), generator=g))
        top, left = cy - self.cutout // 2, cx - self.cutout // 2
        x = x.clone()
        x[:, max(top, 0): max(top + self.cutout, 0), max(left, 0): max(left + self.cutout, 0)] = 0
        return x

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, i = (int(index[0]), int(index[1])) if isinstance(index, tuple) else (self.epoch,
                                                                                    int(index))
        row = int(self.rows[i])
        x = self._source(row)
        if self.views == 1:
            return self._view(x, 0, row, epoch), self._label(row, epoch)
        return (torch.stack([self._view(x, v, row, epoch) for v in range(self.views)]),
                self._label(row, epoch))


class TimmTrainDataset(TrainDataset):
    """Training view of preset timm: timm's training ``transform`` of the decoded image, with
    ``random``, NumPy's and torch's CPU RNG seeded from ``derive_seed("view", seed, epoch, row,
    view)`` for each view (their states put back afterwards in the main process: once per
    example, or once per batch through ``__getitems__``, the DataLoader's batched fetch); label
    noise as in :class:`TrainDataset`. ``image_size`` is the training crop size."""

    def __init__(self, *args: Any, transform: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.transform = transform

    def _source(self, row: int) -> Image.Image:
        return self._pil(row)

    def _view(self, x: Image.Image, view: int, row: int, epoch: int) -> Tensor:
        seed_rngs(derive_seed("view", self.seed, epoch, row, view))
        return self.transform(x)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        with kept_rngs():
            return super().__getitem__(index)

    def __getitems__(self, indices: list) -> list[tuple[Tensor, int]]:
        with kept_rngs():
            return [TrainDataset.__getitem__(self, i) for i in indices]


@dataclass
class Splits:
    """What :func:`load_splits` returns; ``mean``/``std`` are the normalisation constants.
    ``settings``: the ``data`` keys the preset resolved from the model (preset timm: image_size,
    test_image_size, interpolation, crop_pct, mean, std; empty for small), which a run records
    so that its data can be rebuilt without the model."""

    train: TrainDataset
    holdout: ImageDataset
    test: ImageDataset
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    settings: dict[str, Any] = field(default_factory=dict)


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


def _keep_classes(parts: dict[str, datasets.Dataset], labels: dict[str, Tensor],
                  names: list[str], classes: Sequence[int | str], source: str
                  ) -> tuple[dict[str, datasets.Dataset], dict[str, Tensor], list[str]]:
    """Only the examples of ``classes`` (indices or names), relabelled 0.. in that order."""
    wanted = []
    for c in classes:
        index = names.index(c) if isinstance(c, str) and c in names else c
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(names):
            raise UserError(f"data.classes names {c!r}, which is not a class of '{source}'; "
                            f"valid: indices 0..{len(names) - 1} or names {', '.join(names[:12])}"
                            + (", ..." if len(names) > 12 else ""))
        wanted.append(index)
    if len(set(wanted)) != len(wanted) or len(wanted) < 2:
        raise UserError(f"data.classes must name at least two different classes, got "
                        f"{list(classes)}")
    relabel = torch.full((len(names),), -1, dtype=torch.long)
    relabel[torch.tensor(wanted)] = torch.arange(len(wanted))
    kept_parts, kept_labels = {}, {}
    for split, ds in parts.items():
        new = relabel[labels[split]]
        rows = (new >= 0).nonzero().flatten()
        if not len(rows):
            raise UserError(f"split '{split}' of '{source}' has no example of data.classes "
                            f"{list(classes)}")
        kept_parts[split], kept_labels[split] = ds.select(rows.tolist()), new[rows]
    return kept_parts, kept_labels, [names[i] for i in wanted]


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


#: preset-timm keys and their defaults: with preset small, a key set otherwise is an error
_TIMM_ONLY = {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "color_jitter": 0.4,
              "auto_augment": None, "reprob": 0.0, "crop_pct": None, "interpolation": None}


def _check_preset(preset: str, image_size: int | None, cutout: int, given: dict[str, Any]) -> None:
    if preset not in ("small", "timm"):
        raise UserError(f"recipe key 'data.preset' is {preset!r}; valid: small, timm")
    if preset == "small":
        odd = [k for k, default in _TIMM_ONLY.items()
               if given[k] is not None and (default is None or not np.allclose(given[k], default))]
        if odd:
            raise UserError(f"recipe key 'data.{odd[0]}' applies to data.preset=timm (timm's "
                            f"transforms), but data.preset is small; set data.preset=timm or "
                            f"remove data.{odd[0]}")
        if image_size is None:
            raise UserError("recipe key 'data.image_size' is null, which means the model's input "
                            "size with data.preset=timm only; give a size in pixels (e.g. 32) or "
                            "set data.preset=timm")
    elif cutout:
        raise UserError("recipe key 'data.cutout' applies to data.preset=small; with "
                        "data.preset=timm use random erasing (data.reprob) instead")


def _check_stats(mean: Any, std: Any) -> None:
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != 3:
            raise UserError(f"recipe key 'data.{key}' must be a list of 3 numbers (R, G, B), "
                            f"got {list(values)}")
    if std is not None and any(v <= 0 for v in std):
        raise UserError(f"recipe key 'data.std' must be positive numbers, got {list(std)}")


def load_splits(source: str = BUILTIN_DIGITS, seed: int = 0, *, image_column: str = "image",
                label_column: str = "label", train_split: str = "train", test_split: str = "test",
                holdout_split: str | None = None, holdout_fraction: float = 0.1,
                preset: str = "small", image_size: int | None = 32,
                test_image_size: int | None = None, augment: bool = True, hflip: bool = False,
                cutout: int = 0, scale: Any = (0.08, 1.0), ratio: Any = (3 / 4, 4 / 3),
                color_jitter: float | None = 0.4, auto_augment: str | None = None,
                reprob: float = 0.0, crop_pct: float | None = None,
                interpolation: str | None = None, mean: Any = None, std: Any = None,
                label_noise: float = 0.0, max_train_examples: int | None = None,
                classes: Sequence[int | str] | None = None, views: int = 1,
                model: Any = None) -> Splits:
    """Load ``source`` into train (augmented, noisy), hold-out and test datasets.

    The hold-out split is ``holdout_split`` or, when that is None, a stratified
    ``holdout_fraction`` of the training split chosen by ``seed``. ``max_train_examples`` then
    keeps a stratified, seeded subset of what remains for training. ``views`` is the number of
    augmented views per training example (``> 1``: ``[views, 3, S, S]`` tensors).
    ``classes`` (class indices or names) keeps only those classes, in every split, numbered
    0.. in the order given (a task of its own, e.g. for a transfer demo).
    ``preset`` "small" or "timm" (see the module's docstring); with "timm", ``model`` (a name,
    a list of names: the first, or a module) supplies each of image_size, interpolation,
    crop_pct, mean, std left None. ``test_image_size`` (None: ``image_size``) is the size of
    the hold-out and test images.
    """
    _check_preset(preset, image_size, cutout, {"scale": scale, "ratio": ratio,
                                               "color_jitter": color_jitter,
                                               "auto_augment": auto_augment, "reprob": reprob,
                                               "crop_pct": crop_pct,
                                               "interpolation": interpolation})
    _check_stats(mean, std)
    pipeline = None
    if preset == "timm":  # before the data: a bad key or model fails fast
        pipeline = timm_pipeline(model, image_size=image_size, test_image_size=test_image_size,
                                 augment=augment, hflip=hflip, scale=scale, ratio=ratio,
                                 color_jitter=color_jitter, auto_augment=auto_augment,
                                 reprob=reprob, crop_pct=crop_pct, interpolation=interpolation,
                                 mean=mean, std=std)
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
    if classes is not None:
        parts, labels, class_names = _keep_classes(parts, labels, class_names, classes, source)

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
        if pipeline is None:
            _to_uint8(train_hf[0][column], size)
        else:
            _as_rgb(train_hf[0][column])
    except (TypeError, *IMAGE_ERRORS) as e:
        name = _file_of(train_hf, column, 0)
        if name is not None:  # a damaged first image, not a column of something else
            raise UserError(f"image {name} cannot be decoded ({describe(e)}); remove or "
                            "replace it") from None
        raise UserError(f"data.image_column '{column}' of '{source}' does not hold images "
                        f"({type(e).__name__}: {_first_line(e)})") from e
    common = dict(num_classes=len(class_names), seed=seed, augment=augment, hflip=hflip,
                  noisy=noisy, views=views)
    test_hf, test_y = parts[test_split], labels[test_split]
    if pipeline is not None:
        mean, std = pipeline.mean, pipeline.std
        train = TimmTrainDataset(train_hf, column, train_y, pipeline.image_size, mean, std, keep,
                                 transform=pipeline.train, **common)
        holdout = TimmImageDataset(hold_hf, column, hold_y, pipeline.test_image_size, mean, std,
                                   hold, transform=pipeline.eval)
        test = TimmImageDataset(test_hf, column, test_y, pipeline.test_image_size, mean, std,
                                transform=pipeline.eval)
    else:
        raw = ImageDataset(train_hf, column, train_y, size, (0.0,) * 3, (1.0,) * 3)
        raw.cache()
        if mean is None or std is None:
            estimated = _channel_stats(raw)
            mean = estimated[0] if mean is None else mean
            std = estimated[1] if std is None else std
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        train = TrainDataset(train_hf, column, train_y, size, mean, std, keep, cutout=cutout,
                             **common)
        train.cached = raw.cached
        test_size = test_image_size or size
        holdout = ImageDataset(hold_hf, column, hold_y, test_size, mean, std, hold)
        test = ImageDataset(test_hf, column, test_y, test_size, mean, std)
    holdout.cache()
    test.cache()
    return Splits(train=train, holdout=holdout, test=test, num_classes=len(class_names),
                  class_names=class_names, mean=mean, std=std,
                  settings={} if pipeline is None else pipeline.settings)
