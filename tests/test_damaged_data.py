"""Damaged data files are one line naming the file, exit 2, and nothing written: truncated PNG
and JPEG images, a PNG whose header claims 20000x20000 pixels (PIL's decompression bomb), and a
NaN in a COCO bbox; for ``collabsurgery finetune-detection`` and for ``collabsurgery train`` on
an image folder.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import collabsurgery as cs
from collabsurgery import cli
from collabsurgery.detection import write_digits_detection

pytestmark = pytest.mark.usefixtures("forget_accelerate_state", "one_thread")


def truncated(path: Path, fmt: str) -> Path:
    """A 64x64 noise image in ``fmt`` cut to half its bytes: the header (and so its size)
    reads, the pixel data ends early."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def bomb(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims ``side`` x ``side`` 8-bit grey pixels (no pixel data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def snapshot(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def one_line_exit_2(argv: list[str], root: Path, capsys) -> str:
    """Run the CLI; assert exit 2, one line, no traceback, nothing under ``root`` changed."""
    before = snapshot(root)
    capsys.readouterr()
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("collabsurgery"), line
    assert snapshot(root) == before
    return line


# ---------------------------------------------------------------------------- detection

@pytest.fixture(scope="module")
def detection(tmp_path_factory) -> Path:
    """A tiny digits detection dataset and a ResNet-18 export beside it."""
    root = tmp_path_factory.mktemp("damaged-detection")
    write_digits_detection(root / "digits", seed=0, canvas=64, train_images=4, val_images=2,
                           digit_size=(12, 24))
    net = cs.wrap("torchvision.resnet18", split="layer2", heads=2, num_classes=10,
                  input_size=(3, 64, 64))
    cs.export(net, head=0, path=root / "r18.safetensors")
    return root


def _truncated_val_png(data: Path) -> str:
    truncated(data / "val" / "000001.png", "PNG")
    return r"val/instances.json: image id 2: .*val/000001\.png is not a readable image " \
           r"\(OSError: .*truncated"


def _truncated_train_jpeg(data: Path) -> str:
    truncated(data / "train" / "000002.jpg", "JPEG")
    coco = json.loads((data / "train" / "instances.json").read_text())
    coco["images"][2]["file_name"] = "000002.jpg"
    (data / "train" / "instances.json").write_text(json.dumps(coco))
    return r"image id 3: .*train/000002\.jpg is not a readable image \(OSError: .*truncated"


def _bomb_png(data: Path) -> str:
    bomb(data / "train" / "000000.png")
    coco = json.loads((data / "train" / "instances.json").read_text())
    coco["images"][0].update(width=20000, height=20000)
    (data / "train" / "instances.json").write_text(json.dumps(coco))
    return r"image id 1: .*train/000000\.png is not a readable image \(its header claims more " \
           r"than [\d,]+ pixels, PIL's decompression-bomb limit\)"


def _nan_bbox(data: Path) -> str:
    text = (data / "train" / "instances.json").read_text()
    coco = json.loads(text)
    box = coco["annotations"][0]["bbox"]
    # as another tool writes it: json.dumps spells a float NaN as the bare token NaN
    coco["annotations"][0]["bbox"] = [box[0], float("nan"), box[2], box[3]]
    (data / "train" / "instances.json").write_text(json.dumps(coco))
    return r"annotation id 1 \(image id 1\) has a non-finite bbox \[\d+, nan, \d+, \d+\]"


#: each damage by name (also the cases of tests/test_bad_inputs.py's parametrised test)
DETECTION_DAMAGES = {f.__name__.strip("_"): f for f in (_truncated_val_png, _truncated_train_jpeg,
                                                         _bomb_png, _nan_bbox)}


@pytest.mark.parametrize("damage", DETECTION_DAMAGES.values(), ids=DETECTION_DAMAGES)
def test_damaged_detection_data_is_one_line_exit_2_and_writes_nothing(damage, detection,
                                                                       tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(detection / "digits", data)
    match = damage(data)
    argv = ["finetune-detection", "--backbone", str(detection / "r18.safetensors"), "--data",
            str(data), "--output", str(tmp_path / "out"), "--epochs", "1", "--max-steps", "1"]
    line = one_line_exit_2(argv, tmp_path, capsys)
    assert re.search(match, line), line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- image folders

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image folder (train/test, two classes) of 8x8 PNGs and a small recipe for it."""
    from helpers import tiny_recipe

    from collabsurgery.config.recipe import save_recipe

    root = tmp_path_factory.mktemp("damaged-folder")
    pixels = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    for i, image in enumerate(pixels):
        where = root / "images" / ("train" if i < 30 else "test") / str(i % 2)
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(where / f"{i}.png")
    save_recipe(tiny_recipe(root / "runs", "data.max_train_examples=null"), root / "ok.yaml")
    return root


@pytest.mark.parametrize("name,damage,match", [
    ("cut.png", lambda p: truncated(p, "PNG"),
     r"image .*cut\.png cannot be decoded \(OSError: .*truncated"),
    ("cut.jpg", lambda p: truncated(p, "JPEG"),
     r"image .*cut\.jpg cannot be decoded \(OSError: .*truncated"),
    ("bomb.png", bomb, (r"image .*bomb\.png cannot be decoded \(its header claims more than "
                        r"[\d,]+ pixels, PIL's decompression-bomb limit\)")),
])
def test_damaged_image_in_a_folder_is_one_line_exit_2_and_writes_nothing(name, damage, match,
                                                                          folder, tmp_path,
                                                                          capsys):
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    damage(images / "train" / "1" / name)
    datasets.disable_progress_bars()
    argv = ["train", "--recipe", str(folder / "ok.yaml"), f"data.source={images}",
            f"run.dir={tmp_path / 'runs'}"]
    line = one_line_exit_2(argv, tmp_path, capsys)
    assert re.search(match, line), line
    assert not (tmp_path / "runs").exists()


def test_a_damaged_first_image_is_named_not_taken_for_a_column_of_non_images(folder, tmp_path,
                                                                               capsys):
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    for path in (images / "train" / "0").iterdir():  # whichever row comes first is damaged
        truncated(path, "PNG")
    datasets.disable_progress_bars()
    argv = ["train", "--recipe", str(folder / "ok.yaml"), f"data.source={images}",
            f"run.dir={tmp_path / 'runs'}"]
    line = one_line_exit_2(argv, tmp_path, capsys)
    assert re.search(r"image .*train/0/\d+\.png cannot be decoded \(OSError: .*truncated",
                     line), line
