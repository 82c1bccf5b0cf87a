"""``collabsurgery finetune-detection`` / ``tools/finetune_detection.py``: options and run.

Data: ``--data builtin:digits-detection`` (the default; written under ``--data-dir`` or
``~/.cache/collabsurgery`` on first use), ``--data DIR`` with ``DIR/train/instances.json`` and
``DIR/val/instances.json`` (COCO format, ``file_name`` relative to each split directory), or
``--train DIR --val DIR`` with an ``instances.json`` in each.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from accelerate import PartialState

from collabsurgery.detection import digits
from collabsurgery.detection.detector import read_backbone
from collabsurgery.detection.finetune import FinetuneConfig, finetune
from collabsurgery.errors import UserError

LR_PER_IMAGE = 0.00125  # torchvision's detection reference: 0.02 for 8 GPUs x 2 images


def _ranged(low: int, high: int | None = None):
    """An argparse type: an integer in low..high."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got '{text}'")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got '{text}'")
    return value


def _indices(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fine-tuning options to ``parser``."""
    parser.add_argument("--backbone", required=True, metavar="EXPORT",
                        help="a backbone exported by collabsurgery export (.safetensors)")
    parser.add_argument("--data", default=digits.NAME,
                        help=f"{digits.NAME} (default) or DIR with train/instances.json and "
                             "val/instances.json (COCO format)")
    parser.add_argument("--train", default=None, metavar="DIR",
                        help="training split: a directory with instances.json (with --val; "
                             "instead of --data)")
    parser.add_argument("--val", default=None, metavar="DIR",
                        help="validation split: a directory with instances.json")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="where the built-in dataset is written (default: "
                             "~/.cache/collabsurgery)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="run directory (default: runs/detection-<backbone file name>)")
    parser.add_argument("--epochs", type=_ranged(1), default=10,
                        help="epochs to train (default %(default)s)")
    parser.add_argument("--batch-size", type=_ranged(1), default=8,
                        help="images per step and process (default %(default)s)")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help=f"SGD learning rate (default {LR_PER_IMAGE:g} x the images per step "
                             "over all processes: 0.01 for batch size 8, as torchvision's 0.02 "
                             "for 16)")
    parser.add_argument("--momentum", type=float, default=0.9,
                        help="SGD momentum (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="SGD weight decay (default %(default)s)")
    parser.add_argument("--warmup-steps", type=_ranged(0), default=100,
                        help="linear learning-rate warm-up over the first N steps (default "
                             "%(default)s)")
    parser.add_argument("--clip-grad-norm", type=float, default=10.0, metavar="NORM",
                        help="clip the gradient norm to NORM, 0 for no clipping (default "
                             "%(default)s)")
    parser.add_argument("--trainable-layers", type=_ranged(0, 5), default=3,
                        help="backbone stages trained, counted from the last (0: backbone "
                             "frozen, 5: all; default 3 as torchvision's recipe)")
    parser.add_argument("--out-indices", type=_indices, default=None, metavar="I,J,...",
                        help="feature levels under the FPN (timm numbering; default: the last "
                             "4 with stride >= 4, for ResNets 1,2,3,4 = layer1..layer4)")
    parser.add_argument("--min-size", type=_ranged(1), default=None,
                        help="images are resized so the shorter side is this (default: the "
                             "canvas size for the built-in data, else 800)")
    parser.add_argument("--max-size", type=_ranged(1), default=None,
                        help="... and the longer at most this (default: the canvas size for "
                             "the built-in data, else 1333)")
    parser.add_argument("--anchor-size", type=_positive_float, default=32.0,
                        help="anchor size at stride 4, doubling per level (default "
                             "%(default)s)")
    parser.add_argument("--rois-per-image", type=_ranged(1), default=None,
                        help="proposals sampled per image to train the box head (default: 128 "
                             "for the built-in data, else 512 as torchvision)")
    parser.add_argument("--proposals", type=_ranged(1), default=None,
                        help="RPN proposals per image for the box head in evaluation, twice "
                             "that in training (default: 100 for the built-in data, else 1000 "
                             "as torchvision)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="autocast precision (default %(default)s)")
    parser.add_argument("--max-steps", type=_ranged(1), default=None,
                        help="at most N steps per epoch (for quick tests; default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --output")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the new layers, the batch order and every random draw "
                             "(default %(default)s)")
    parser.add_argument("--num-workers", type=_ranged(0), default=0,
                        help="DataLoader worker processes (default %(default)s)")
    parser.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                        help="when stderr is not a terminal, a progress line at most every "
                             "SECONDS (default %(default)s)")


def _splits(args: argparse.Namespace) -> tuple[Path, Path, int | None]:
    """Train and val directories, and the canvas size of the built-in data (else None)."""
    if args.train is not None or args.val is not None:
        if args.train is None or args.val is None:
            raise UserError("--train and --val go together (one directory with instances.json "
                            "each)")
        if args.data != digits.NAME:
            raise UserError("give --data DIR or --train DIR --val DIR, not both")
        return Path(args.train), Path(args.val), None
    if args.data == digits.NAME:
        root = digits.builtin_digits(args.data_dir)
        return root / "train", root / "val", digits.CANVAS
    if args.data.startswith("builtin:"):
        raise UserError(f"unknown built-in dataset '{args.data}'; valid: {digits.NAME} or a "
                        "directory")
    return Path(args.data) / "train", Path(args.data) / "val", None


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` the parsed options describe (writes the built-in data on
    first use)."""
    read_backbone(args.backbone)  # a bad export is reported before the data is written
    train, val, canvas = _splits(args)
    min_size = args.min_size or canvas or 800
    processes = PartialState().num_processes
    max_size = args.max_size or max(canvas or 1333, min_size)
    backbone = Path(args.backbone)
    output = Path(args.output) if args.output else Path("runs") / f"detection-{backbone.stem}"
    return FinetuneConfig(
        backbone=backbone, train=train, val=val, output=output, epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr or LR_PER_IMAGE * args.batch_size * processes, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        clip_grad_norm=args.clip_grad_norm or None, log_every=args.log_every,
        trainable_layers=args.trainable_layers, out_indices=args.out_indices,
        min_size=min_size, max_size=max_size, anchor_size=args.anchor_size,
        rois_per_image=args.rois_per_image or (128 if canvas else 512),
        proposals=args.proposals or (100 if canvas else 1000),
        mixed_precision=args.mixed_precision, max_steps=args.max_steps, resume=args.resume,
        seed=args.seed, num_workers=args.num_workers)


def run(args: argparse.Namespace) -> None:
    """Fine-tune as the parsed options say (UserError on bad input, before writing)."""
    finetune(config_from_args(args))
