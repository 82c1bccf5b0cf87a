"""The built-in detection example: scikit-learn's handwritten digits placed on larger canvases.

``builtin:digits-detection`` is written once, offline, as a COCO dataset::

    <cache>/digits-detection-v1/train/instances.json, train/000000.png, ...
    <cache>/digits-detection-v1/val/instances.json,   val/000000.png, ...

Each canvas is black (grayscale PNG) with 1..4 digits, each upscaled from 8x8 to a random size
and pasted at a random position overlapping no other digit; boxes are the pasted squares and
categories "0".."9" have ids 1..10. The source digits are split 80/20 before drawing, so no
digit image appears in both splits. Everything is drawn from generators seeded by ``seed``:
the same arguments write the same files. Writing goes to a temporary directory that is renamed
into place, so a crash never leaves a half-written dataset behind.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from collabsurgery.common.seeding import generator
from collabsurgery.errors import UserError

NAME = "builtin:digits-detection"
VERSION = "digits-detection-v1"
CANVAS = 128


def default_cache() -> Path:
    """Where built-in datasets go: ``$XDG_CACHE_HOME/collabsurgery`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "collabsurgery"


def _source_split(labels: np.ndarray, seed: int) -> tuple[list[int], list[int]]:
    """Source digit indices for train and val: 20% of each class to val."""
    gen = generator("digits-detection-split", seed)
    train, val = [], []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        order = members[torch.randperm(len(members), generator=gen).numpy()]
        cut = round(0.2 * len(order))
        val += order[:cut].tolist()
        train += order[cut:].tolist()
    return sorted(train), sorted(val)


def _place(gen: torch.Generator, canvas: int, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of ``sizes`` that overlap nothing; None if none found."""
    placed: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(100):
            x, y = (int(v) for v in torch.randint(0, canvas - size + 1, (2,), generator=gen))
            if all(x + size <= px or px + ps <= x or y + size <= py or py + ps <= y
                   for px, py, ps in placed):
                placed.append((x, y, size))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _draw_split(directory: Path, pixels: np.ndarray, labels: np.ndarray, pool: list[int],
                count: int, canvas: int, digit_size: tuple[int, int], seed: int,
                split: str) -> None:
    images, annotations = [], []
    for index in range(count):
        gen = generator("digits-detection", seed, split, index)
        while True:
            n = int(torch.randint(1, 5, (), generator=gen))
            sizes = torch.randint(digit_size[0], digit_size[1] + 1, (n,), generator=gen).tolist()
            corners = _place(gen, canvas, sizes)
            if corners is not None:
                break
        picks = torch.randint(0, len(pool), (n,), generator=gen).tolist()
        image = np.zeros((canvas, canvas), dtype=np.uint8)
        for (x, y), size, pick in zip(corners, sizes, picks):
            source = pool[pick]
            digit = Image.fromarray(pixels[source]).resize((size, size), Image.BILINEAR)
            image[y:y + size, x:x + size] = np.asarray(digit)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": int(labels[source]) + 1,
                                "bbox": [x, y, size, size], "area": size * size,
                                "iscrowd": 0, "source_index": source})
        name = f"{index:06d}.png"
        Image.fromarray(image, mode="L").save(directory / name)
        images.append({"id": index + 1, "file_name": name, "width": canvas, "height": canvas})
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]
    (directory / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))


def write_digits_detection(root: str | Path, seed: int = 0, canvas: int = CANVAS,
                           train_images: int = 1000, val_images: int = 200,
                           digit_size: tuple[int, int] = (16, 40)) -> Path:
    """Write the digits detection dataset to ``root`` (``root/train``, ``root/val``) unless it is
    there already; returns ``root``. Same arguments, same files."""
    root = Path(root)
    if all((root / split / "instances.json").is_file() for split in ("train", "val")):
        return root
    if not 8 <= digit_size[0] <= digit_size[1] <= canvas:
        raise ValueError(f"digit_size {digit_size} must lie in 8..{canvas}")
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = np.rint(raw.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    labels = raw.target
    pools = dict(zip(("train", "val"), _source_split(labels, seed)))
    tmp = root.parent / f".{root.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    try:
        for split, count in (("train", train_images), ("val", val_images)):
            (tmp / split).mkdir()
            _draw_split(tmp / split, pixels, labels, pools[split], count, canvas, digit_size,
                        seed, split)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (root / "val" / "instances.json").is_file():
                raise  # not a concurrent writer finishing first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def builtin_digits(cache: str | Path | None = None) -> Path:
    """The built-in dataset's directory, written on first use under ``cache``."""
    root = Path(cache or default_cache()) / VERSION
    try:
        return write_digits_detection(root)
    except OSError as err:
        raise UserError(f"cannot write the built-in dataset to {root} ({err.strerror or err}); "
                        "valid: --data-dir DIR in a writable directory") from None
