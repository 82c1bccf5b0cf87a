"""Training-loader throughput: our loader against timm's and torchvision's, on full-size JPEGs.

    python tools/bench_data.py                        # 2,000 JPEGs, 224 px, RandAugment, 2 workers
    python tools/bench_data.py --workers 0,2 --repeats 5 --files 3000 --dir /tmp/jpegs

The images: scikit-learn's 8x8 digits (shipped with it, no network) upscaled to 256-500 px
and pasted in colour onto canvases of varied sizes and aspect ratios (each side 256-500 px,
a coloured, noisy background), saved as JPEG (quality 90) in an imagefolder ``<dir>/train/<digit>/``
(and ``<dir>/test/``, 10%), made once in ``--dir`` (a temporary folder when not given).

Three loaders, the same training transform (timm's ``create_transform(is_training=True)`` with
the model's data configuration: RandomResizedCrop to ``--image-size``, flips, ``--auto-augment``
(timm turns colour jitter off with it), ``--reprob``), batch size and worker count, workers
persistent, ``prefetch_factor`` 2, no pinned memory (a CPU):

- ``ours``: ``load_splits(dir, preset="timm", model=--model, ...)`` and the engine's batch
  provider, ``SharedBatches`` prepared by Accelerate (seedable sampler), as ``setup`` builds
  them: the datasets ``imagefolder`` (decoded by the datasets Image feature), each view's RNGs
  seeded from (seed, epoch, example, view), the epoch carried by the sampler's indices.
- ``timm``: ``timm.data.create_dataset`` (a folder reader) and ``timm.data.create_loader``
  (``use_prefetcher=False`` on a CPU), the same transform settings.
- ``torchvision``: ``torchvision.datasets.ImageFolder`` with timm's transform and a
  ``DataLoader`` (shuffled, ``drop_last``).

One timed round is one full epoch of a loader (``iter`` to exhaustion: the epoch's start,
prefetch ramp-up included, as training pays it), after one untimed warm-up epoch per loader
that also starts its persistent workers. Rounds are interleaved and their order rotated (ours,
timm, torchvision; timm, torchvision, ours; ...) so drifts of a shared machine, and whatever
running first or after another loader does, hit all alike. Reported per loader and worker
count: images per second (median of the rounds, wall clock: workers are other processes), the
run-to-run spread ((max - min) / median), the CPU time of all processes (main and workers, with
psutil) per image, and for ours the ratios to the best of the other two: of the medians, and
the median of the per-round ("paired") ratios, each round's loaders measured back to back.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

LOADERS = ("ours", "timm", "torchvision")


def make_images(root: Path, files: int, seed: int = 0) -> Path:
    """``files`` JPEGs of the digits in ``root/{train,test}/<digit>/`` (kept when present)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(files):
        return root
    rng = np.random.default_rng(seed)
    digits = load_digits()
    for i in range(files):
        k = i % len(digits.target)
        w, h = (int(v) for v in rng.integers(256, 501, size=2))
        canvas = rng.integers(0, 256, size=3)[None, None, :] + rng.normal(0, 12, (h, w, 3))
        image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        side = int(rng.integers(int(0.4 * min(w, h)), min(w, h) + 1))
        glyph = Image.fromarray((digits.images[k] * (255 / 16)).astype(np.uint8))
        glyph = glyph.resize((side, side), Image.BICUBIC)
        ink = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.paste(ink, (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))),
                    glyph)
        split = "test" if i % 10 == 9 else "train"
        folder = root / split / str(digits.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    done.write_text(str(files))
    return root


def transform_settings(args: argparse.Namespace) -> dict:
    """create_transform's training arguments from the model's data configuration."""
    from collabsurgery.data.transforms import model_data_config

    cfg = model_data_config(args.model)
    return dict(input_size=args.image_size, is_training=True, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4,
                auto_augment=args.auto_augment or None, interpolation=cfg["interpolation"],
                mean=cfg["mean"], std=cfg["std"], re_prob=args.reprob)


def build_ours(root: Path, args: argparse.Namespace, workers: int):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    from collabsurgery.data.batches import SharedBatches
    from collabsurgery.data.datasets import load_splits

    splits = load_splits(str(root), seed=0, preset="timm", model=args.model,
                         image_size=args.image_size, hflip=True,
                         auto_augment=args.auto_augment or None, reprob=args.reprob,
                         holdout_fraction=0.01)
    provider = SharedBatches(splits.train, args.batch_size, workers)
    AcceleratorState._reset_state()
    provider.prepare(Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=0)))
    epoch = iter(range(10**9))

    def one_epoch():
        provider.set_epoch(next(epoch))
        return provider.batches()
    return one_epoch


def build_timm(root: Path, args: argparse.Namespace, workers: int):
    from timm.data import create_dataset, create_loader

    t = transform_settings(args)
    dataset = create_dataset("", root=str(root / "train"), split="train", is_training=True)
    loader = create_loader(
        dataset, input_size=(3, args.image_size, args.image_size), batch_size=args.batch_size,
        is_training=True, use_prefetcher=False, scale=t["scale"], ratio=t["ratio"],
        hflip=t["hflip"], color_jitter=t["color_jitter"], auto_augment=t["auto_augment"],
        interpolation=t["interpolation"], mean=t["mean"], std=t["std"], re_prob=t["re_prob"],
        num_workers=workers, pin_memory=False, persistent_workers=workers > 0)
    return lambda: iter(loader)


def build_torchvision(root: Path, args: argparse.Namespace, workers: int):
    from timm.data import create_transform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    t = transform_settings(args)
    dataset = ImageFolder(str(root / "train"), transform=create_transform(**t))
    options = dict(persistent_workers=True, prefetch_factor=2) if workers else {}
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, **options)
    return lambda: iter(loader)


BUILDERS = {"ours": build_ours, "timm": build_timm, "torchvision": build_torchvision}


def cpu_seconds() -> float:
    """CPU time so far of this process and its live children (the loaders' workers), or NaN
    without psutil."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a worker that just ended
            pass
    return total


def timed_epoch(one_epoch) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of every process) of one full epoch."""
    start, cpu, images = time.perf_counter(), cpu_seconds(), 0
    for x, _ in one_epoch():
        images += len(x)
    return images, time.perf_counter() - start, cpu_seconds() - cpu


def run(args: argparse.Namespace) -> dict:
    import datasets
    import PIL
    import timm
    import torchvision

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as scratch:
        root = make_images(Path(args.dir) if args.dir else Path(scratch) / "images", args.files)
        datasets.config.HF_DATASETS_CACHE = str(Path(scratch) / "hf_cache")
        rows = []
        for workers in args.workers:
            epochs = {name: BUILDERS[name](root, args, workers) for name in args.loaders}
            for one_epoch in epochs.values():
                timed_epoch(one_epoch)  # warm-up: starts the persistent workers
            rates: dict[str, list[float]] = {name: [] for name in epochs}
            costs: dict[str, list[float]] = {name: [] for name in epochs}
            names = list(epochs)
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:  # rotated
                    one_epoch = epochs[name]
                    images, seconds, cpu = timed_epoch(one_epoch)
                    rates[name].append(images / seconds)
                    costs[name].append(1e3 * cpu / images)
            for name, r in rates.items():
                med = statistics.median(r)
                rows.append({"loader": name, "workers": workers, "images_per_s": med,
                             "spread": (max(r) - min(r)) / med, "rounds": r,
                             "cpu_ms_per_image": statistics.median(costs[name]),
                             "cpu_rounds": costs[name]})
            del epochs
    for row in rows:
        others = [o for o in rows if o["workers"] == row["workers"] and o["loader"] != "ours"]
        if row["loader"] == "ours" and others:
            row["ratio_to_best_other"] = (row["images_per_s"]
                                          / max(o["images_per_s"] for o in others))
            row["cpu_ratio_to_best_other"] = (row["cpu_ms_per_image"]
                                              / min(o["cpu_ms_per_image"] for o in others))
            row["paired_ratio"] = statistics.median(
                ours / max(o["rounds"][k] for o in others) for k, ours in enumerate(row["rounds"]))
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "timm": timm.__version__,
                "datasets": datasets.__version__, "pillow": PIL.__version__}
    return {"config": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
            "versions": versions, "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, {platform.platform()}"}


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"{cfg['files']} JPEGs (256-500 px), {cfg['image_size']} px crops, batch "
             f"{cfg['batch_size']}, auto_augment {cfg['auto_augment'] or 'none'}, reprob "
             f"{cfg['reprob']}, {cfg['repeats']} rounds of one epoch each, interleaved",
             f"{'loader':<12} {'workers':>7} {'images/s':>9} {'spread':>7} {'ours/best':>9} "
             f"{'paired':>7} {'CPU ms/img':>10} {'ours/best':>9}"]

    def num(value, spec):
        return "" if value is None else format(value, spec)
    for row in result["rows"]:
        lines.append(f"{row['loader']:<12} {row['workers']:>7} {row['images_per_s']:>9.1f} "
                     f"{row['spread']:>7.1%} {num(row.get('ratio_to_best_other'), '.3f'):>9} "
                     f"{num(row.get('paired_ratio'), '.3f'):>7} "
                     f"{row['cpu_ms_per_image']:>10.2f} "
                     f"{num(row.get('cpu_ratio_to_best_other'), '.3f'):>9}")
    lines.append("images/s: median of the rounds (wall clock); spread: (max - min) / median; "
                 "ours/best: against the best of timm and torchvision (images/s: higher is "
                 "better; CPU: lower is better); paired: median of the per-round ratios; "
                 "CPU ms/img: median CPU time of every process (main + workers) per image")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    lines.append("machine: " + result["machine"])
    return "\n".join(lines)


def _counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="where the JPEGs are made (kept); default a temporary folder")
    ap.add_argument("--files", type=int, default=2000, help="JPEGs to make (10%% for test/)")
    ap.add_argument("--model", default="resnet50", help="whose data configuration to use")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=_counts, default=[2], help="comma-separated, e.g. 0,2")
    ap.add_argument("--auto-augment", default="rand-m9-mstd0.5",
                    help="'' for none (the inc1 policies crash timm's own posterize on Pillow 13)")
    ap.add_argument("--reprob", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per loader")
    ap.add_argument("--loaders", type=lambda s: [v for v in s.split(",") if v],
                    default=list(LOADERS), help=f"comma-separated: {', '.join(LOADERS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    bad = [name for name in args.loaders if name not in LOADERS]
    if bad or args.files < 20 or args.repeats < 1 or args.batch_size < 1:
        ap.error(f"valid: --loaders from {', '.join(LOADERS)}, --files >= 20, --repeats >= 1, "
                 "--batch-size >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
