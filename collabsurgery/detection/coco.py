"""COCO-format detection data: loading with validation, a dataset class, and a collate function.

A split is a directory holding ``instances.json`` (COCO: ``images``, ``annotations``,
``categories``) and the image files it names (``file_name`` relative to that directory). Every
problem is one :class:`~collabsurgery.errors.UserError` line naming the image, annotation or
category at fault, raised before a run writes anything: every image is decoded in full (a
truncated file, or one whose header claims more pixels than PIL's decompression-bomb limit, is
named) and every box must be finite and inside its image.

Category ids may be any positive integers; they map to contiguous labels ``1..K`` in increasing
id order (0 is torchvision's background) and back for COCOeval.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from collabsurgery.common.images import IMAGE_ERRORS, describe, load_image
from collabsurgery.errors import UserError

INSTANCES = "instances.json"
LAYOUT = ("a directory with train/instances.json and val/instances.json (COCO format, "
          "file_name relative to each), or --train DIR --val DIR")


@dataclass
class CocoSplit:
    """One validated split: the COCO dict (with ``area``/``iscrowd`` filled in) and its root."""

    root: Path
    coco: dict[str, Any]

    @property
    def category_ids(self) -> list[int]:
        """Declared category ids in increasing order; label ``i + 1`` is ``category_ids[i]``."""
        return sorted(c["id"] for c in self.coco["categories"])

    @property
    def category_names(self) -> list[str]:
        """Category names in label order."""
        names = {c["id"]: str(c.get("name", c["id"])) for c in self.coco["categories"]}
        return [names[i] for i in self.category_ids]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read(root: Path) -> dict[str, Any]:
    file = root / INSTANCES
    if not root.is_dir():
        raise UserError(f"dataset path {root} is not a directory; valid: {LAYOUT}")
    if not file.is_file():
        raise UserError(f"dataset path {root} has no {INSTANCES}; valid: {LAYOUT}")
    try:
        coco = json.loads(file.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"{file} is not readable JSON ({err})") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise UserError(f"{file} lacks a list under images, annotations or categories; valid: "
                        "a COCO instances file")
    return coco


def _check_categories(file: Path, coco: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for cat in coco["categories"]:
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cid) or cid < 1 or cid in ids:
            raise UserError(f"{file}: category {cat!r} needs a unique positive integer id")
        ids.add(cid)
    if not ids:
        raise UserError(f"{file} declares no categories; valid: at least one in 'categories'")
    return ids


def _check_images(root: Path, coco: dict[str, Any]) -> dict[int, dict[str, Any]]:
    file = root / INSTANCES
    images: dict[int, dict[str, Any]] = {}
    for img in coco["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        if not _is_int(iid) or iid in images:
            raise UserError(f"{file}: image {img!r} needs a unique integer id")
        if not (_is_int(img.get("width")) and _is_int(img.get("height"))
                and isinstance(img.get("file_name"), str)):
            raise UserError(f"{file}: image id {iid} needs integer width, height and a "
                            "file_name")
        path = root / img["file_name"]
        if not path.is_file():
            raise UserError(f"{file}: image id {iid}: image file {path} is missing")
        try:  # fully decoded: a truncated file must fail here, before a run writes
            with load_image(path) as opened:
                size = opened.size
        except IMAGE_ERRORS as err:
            raise UserError(f"{file}: image id {iid}: {path} is not a readable image "
                            f"({describe(err)}); remove or replace it") from None
        if size != (img["width"], img["height"]):
            raise UserError(f"{file}: image id {iid}: {path} is {size[0]}x{size[1]} but "
                            f"declared {img['width']}x{img['height']}")
        images[iid] = img
    return images


def _check_annotation(file: Path, ann: Any, images: dict[int, dict[str, Any]],
                      categories: set[int], seen: set[int]) -> None:
    aid = ann.get("id") if isinstance(ann, dict) else None
    if not _is_int(aid) or aid in seen:
        raise UserError(f"{file}: annotation {str(ann)[:80]} needs a unique integer id")
    seen.add(aid)
    img = images.get(ann.get("image_id"))
    if img is None:
        raise UserError(f"{file}: annotation id {aid} names image id {ann.get('image_id')!r}, "
                        "which 'images' does not declare")
    cid = ann.get("category_id")
    if cid not in categories:
        raise UserError(f"{file}: annotation id {aid} (image id {img['id']}) uses category id "
                        f"{cid!r}, which 'categories' does not declare; declared: "
                        f"{', '.join(map(str, sorted(categories)))}")
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise UserError(f"{file}: annotation id {aid} (image id {img['id']}) needs bbox "
                        f"[x, y, width, height], got {box!r}")
    if not all(math.isfinite(v) for v in box):
        raise UserError(f"{file}: annotation id {aid} (image id {img['id']}) has a non-finite "
                        f"bbox {box} (NaN or infinity); valid: finite [x, y, width, height]")
    x, y, w, h = box
    if w <= 0 or h <= 0:
        raise UserError(f"{file}: annotation id {aid} (image id {img['id']}) has an empty box "
                        f"{box} (width and height must be > 0)")
    if x < 0 or y < 0 or x + w > img["width"] or y + h > img["height"]:
        raise UserError(f"{file}: annotation id {aid} (image id {img['id']}) has box "
                        f"[x, y, w, h] = {box} outside the {img['width']}x{img['height']} image")


def load_split(root: str | Path) -> CocoSplit:
    """Read and validate the COCO split in directory ``root``; UserError on the first problem."""
    root = Path(root)
    coco = _read(root)
    file = root / INSTANCES
    categories = _check_categories(file, coco)
    images = _check_images(root, coco)
    seen: set[int] = set()
    for ann in coco["annotations"]:
        _check_annotation(file, ann, images, categories, seen)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    return CocoSplit(root, coco)


def load_splits(train: str | Path, val: str | Path) -> tuple[CocoSplit, CocoSplit]:
    """Both splits, validated, with the same categories (so labels mean the same in each)."""
    splits = load_split(train), load_split(val)
    for split in splits:
        if not split.coco["images"]:
            raise UserError(f"{split.root / INSTANCES} lists no images; valid: at least one")
    declared = [{c["id"] for c in s.coco["categories"]} for s in splits]
    if declared[0] != declared[1]:
        raise UserError(f"{splits[0].root} and {splits[1].root} declare different category ids "
                        f"({sorted(declared[0])} vs {sorted(declared[1])}); valid: the same "
                        "categories in both instances.json files")
    return splits


class CocoDetection(Dataset):
    """Images as float ``[3, H, W]`` in 0..1 and torchvision targets (``boxes`` xyxy,
    ``labels`` 1..K, ``image_id``); crowd annotations are left out of the targets."""

    def __init__(self, split: CocoSplit):
        self.root = split.root
        self.images = sorted(split.coco["images"], key=lambda img: img["id"])
        label = {cid: i + 1 for i, cid in enumerate(split.category_ids)}
        self.targets: dict[int, list[tuple[list[float], int]]] = {
            img["id"]: [] for img in self.images}
        for ann in split.coco["annotations"]:
            if not ann["iscrowd"]:
                x, y, w, h = ann["bbox"]
                self.targets[ann["image_id"]].append(
                    ([x, y, x + w, y + h], label[ann["category_id"]]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        img = self.images[index]
        path = self.root / img["file_name"]
        try:  # validated when loaded, but a file may change during a run
            with load_image(path) as opened:
                image = pil_to_tensor(opened.convert("RGB")).float() / 255
        except IMAGE_ERRORS as err:
            raise UserError(f"image id {img['id']}: {path} cannot be decoded "
                            f"({describe(err)}); remove or replace it") from None
        objects = self.targets[img["id"]]
        boxes = torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for _, c in objects], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(img["id"])}


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]
            ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images and targets as two lists (detection images differ in size)."""
    return [image for image, _ in batch], [target for _, target in batch]
