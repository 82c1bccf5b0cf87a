"""Fine-tune a Faster R-CNN on an exported backbone with Accelerate; COCO mAP every epoch.

The output directory holds ``finetune.json`` (the settings), ``metrics.jsonl`` (one record per
epoch, rewritten from the checkpointed history so a crash never duplicates an epoch),
``checkpoints/`` (:mod:`collabsurgery.rundir.checkpoint`, written at the end of every epoch) and, at the
end, ``detector.safetensors``. Every random choice is drawn from generators seeded by
(seed, epoch, step), so a resumed run replays what a straight one would have done, and two runs
with the same seed agree (bit-equal on the CPU).

Defaults follow torchvision's detection reference: SGD with momentum 0.9 and weight decay 1e-4
at 0.00125 x the images per step (its 0.02 for 16; the command line scales it with the batch),
a linear warm-up (100 steps), and the gradient norm clipped at 10, which keeps a backbone with
large activations from sending the first steps' loss to infinity. An image that cannot be
decoded during evaluation stops the run with one line naming it, after the epoch's checkpoint
is saved.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from collabsurgery.common import __version__, atomic
from collabsurgery.common.seeding import derive_seed
from collabsurgery.common.tensorfile import save_safetensors_atomic
from collabsurgery.detection.coco import CocoDetection, CocoSplit, collate, load_splits
from collabsurgery.detection.detector import DetectorInfo, build_detector, read_backbone
from collabsurgery.detection.progress import StepProgress
from collabsurgery.errors import TrainingStopped, UserError
from collabsurgery.rundir import checkpoint, metrics

DETECTOR_FORMAT = "collabsurgery.detector/1"
SETTINGS = "finetune.json"
# settings a resumed run must share with the run it continues
_SAME_ON_RESUME = ("backbone_sha256", "trainable_layers", "out_indices", "min_size", "max_size",
                   "anchor_size", "categories")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; ``train``/``val`` are COCO split directories."""

    backbone: Path
    train: Path
    val: Path
    output: Path
    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    clip_grad_norm: float | None = 10.0
    trainable_layers: int = 3
    out_indices: list[int] | None = None
    min_size: int = 800
    max_size: int = 1333
    anchor_size: float = 32.0
    rois_per_image: int = 512
    proposals: int = 1000
    mixed_precision: str = "no"
    max_steps: int | None = None
    resume: bool = False
    seed: int = 0
    num_workers: int = 0
    keep: int = 2
    log_every: float = 30.0


def _say(message: str) -> None:
    if PartialState().is_main_process:
        print(message, flush=True)


def check_output(output: Path, resume: bool) -> None:
    """UserError if ``output`` cannot hold this run (nothing is created here)."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output {output} cannot be created: {existing} is a file; valid: "
                        "--output DIR in a writable directory")
    if existing == output and not resume and checkpoint.candidates(output / "checkpoints"):
        raise UserError(f"output {output} already holds a fine-tuning run; valid: --resume to "
                        "continue it, or another --output")


def evaluate_coco(model: nn.Module, split: CocoSplit, batch_size: int,
                  device: torch.device, epoch: int = 1, epochs: int = 1) -> dict[str, float]:
    """COCO box mAP of ``model`` on ``split`` (pycocotools' COCOeval): ``mAP`` (IoU .5:.95),
    ``mAP50``, ``mAP75``, and the number of detections. ``epoch``/``epochs`` label the
    progress shown."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    ids = split.category_ids
    results: list[dict[str, Any]] = []
    loader = DataLoader(CocoDetection(split), batch_size=batch_size, collate_fn=collate)
    bar = StepProgress(epoch, epochs, len(loader), math.inf)
    bar.say(f"evaluating on {len(loader.dataset)} validation images")
    with torch.no_grad(), contextlib.closing(bar):
        for images, targets in loader:
            outputs = model([image.to(device) for image in images])
            for target, out in zip(targets, outputs):
                for (x0, y0, x1, y1), score, label in zip(out["boxes"].float().tolist(),
                                                          out["scores"].float().tolist(),
                                                          out["labels"].tolist()):
                    results.append({"image_id": int(target["image_id"]),
                                    "category_id": ids[label - 1], "score": score,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0]})
            bar.tick()
    if not results:
        return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0, "detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        truth = COCO()
        truth.dataset = {"info": {}, "licenses": [], **copy.deepcopy(split.coco)}
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [float(v) for v in evaluation.stats]
    return {"mAP": stats[0], "mAP50": stats[1], "mAP75": stats[2], "detections": len(results)}


def _settings(config: FinetuneConfig, metadata: dict[str, str], info: DetectorInfo,
              train: CocoSplit) -> dict[str, Any]:
    return {"backbone": str(config.backbone), "backbone_sha256": metadata.get("sha256", ""),
            "architecture": info.architecture, "library": info.library, "route": info.route,
            "trainable_layers": config.trainable_layers, "out_indices": info.out_indices,
            "strides": info.strides, "anchor_sizes": info.anchor_sizes,
            "min_size": config.min_size, "max_size": config.max_size,
            "anchor_size": config.anchor_size, "rois_per_image": config.rois_per_image,
            "proposals": config.proposals,
            "train": str(config.train),
            "val": str(config.val), "categories": train.coco["categories"],
            "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
            "momentum": config.momentum, "weight_decay": config.weight_decay,
            "warmup_steps": config.warmup_steps, "clip_grad_norm": config.clip_grad_norm,
            "mixed_precision": config.mixed_precision,
            "max_steps": config.max_steps, "seed": config.seed, "version": __version__}


def _check_resumable(output: Path, settings: dict[str, Any]) -> None:
    try:
        saved = json.loads((output / SETTINGS).read_text())
    except (OSError, ValueError):
        return
    changed = [f"{k}={settings[k]!r} (was {saved.get(k)!r})" for k in _SAME_ON_RESUME
               if k in saved and saved[k] != json.loads(json.dumps(settings[k]))]
    if changed:
        raise UserError(f"{output} was fine-tuned with other settings: {'; '.join(changed)}; "
                        "valid: --resume with the same backbone, data and model options, or "
                        "another --output")


def _precision(requested: str) -> str:
    if requested == "fp16" and PartialState().device.type == "cpu":
        _say("collabsurgery: fp16 needs a GPU; fine-tuning in fp32 on the CPU (bf16 runs there)")
        return "no"
    return requested


def _train_epoch(config: FinetuneConfig, accelerator: Accelerator, model: nn.Module,
                 optimizer: torch.optim.Optimizer, loader: DataLoader,
                 progress: checkpoint.Progress) -> dict[str, float]:
    """One epoch (at most ``max_steps`` steps); mean losses over its steps and processes."""
    epoch = progress.epoch
    loader.set_epoch(epoch)
    model.train()
    steps = len(loader) if config.max_steps is None else min(len(loader), config.max_steps)
    sums: dict[str, torch.Tensor] = {}
    done = 0
    bar = StepProgress(epoch + 1, config.epochs, steps, config.log_every,
                       accelerator.is_main_process)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for index, (images, targets) in enumerate(loader):
        if index >= steps:
            break
        torch.manual_seed(derive_seed("detection", config.seed, epoch, index,
                                      accelerator.process_index))
        warmup = min(1.0, (progress.global_step + 1) / max(config.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup
        with accelerator.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            accelerator.set_trigger()
        if accelerator.check_trigger():  # a collective: every process stops together
            bar.close()
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingStopped(f"non-finite loss at epoch {epoch + 1}, step {index + 1} "
                                  f"(this process: {parts}); stopped every process; "
                                  f"{_kept(config.output)}; try a lower --lr, more "
                                  "--warmup-steps or a smaller --clip-grad-norm")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.clip_grad_norm:
            accelerator.clip_grad_norm_(trainable, config.clip_grad_norm)
        optimizer.step()
        progress.global_step += 1
        done += 1
        for key, value in {"loss": loss, **losses}.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
        bar.step(loss.item())
    bar.close()
    return {("train_" + k if k == "loss" else k): accelerator.reduce(v, "mean").item()
            / max(done, 1) for k, v in sums.items()}


def _kept(output: Path) -> str:
    """What a stopped run leaves to resume from, for its message."""
    found = checkpoint.candidates(output / "checkpoints")
    if not found:
        return "no checkpoint was written yet (none is kept)"
    return f"the last checkpoint, {found[0]}, is kept (--resume continues from it)"


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (or resume) as ``config`` says; returns the last epoch's record (empty if no
    epoch ran) with ``detector`` (the path of the fine-tuned weights) added."""
    metadata = read_backbone(config.backbone)
    train_split, val_split = load_splits(config.train, config.val)
    check_output(config.output, config.resume)
    set_seed(config.seed)
    model, info = build_detector(config.backbone, len(train_split.category_ids),
                                 config.trainable_layers, config.out_indices, config.min_size,
                                 config.max_size, config.anchor_size, config.rois_per_image,
                                 config.proposals)
    settings = _settings(config, metadata, info, train_split)
    found = None
    if config.resume:
        _check_resumable(config.output, settings)
        found = checkpoint.load_latest(config.output / "checkpoints", warn=_say)

    # Accelerate keeps mixed precision in a process-wide singleton; forget it so that a second
    # run in the same process may use another setting.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=_precision(config.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=config.seed))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    loader = DataLoader(CocoDetection(train_split), batch_size=config.batch_size, shuffle=True,
                        collate_fn=collate, num_workers=config.num_workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    detector = accelerator.unwrap_model(model)
    progress = checkpoint.Progress()
    if found is not None:
        path, (model_state, states, progress) = found
        detector.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(states["optimizer"])
        _say(f"resuming from {path} (epoch {progress.epoch} of {config.epochs} done)")
    elif config.resume:
        _say(f"no checkpoint in {config.output / 'checkpoints'}; starting from the backbone")
    if accelerator.is_main_process:
        atomic.write_text(config.output / SETTINGS, json.dumps(settings, indent=1))
    record: dict[str, Any] = {}
    while progress.epoch < config.epochs:
        started = time.perf_counter()
        losses = _train_epoch(config, accelerator, model, optimizer, loader, progress)
        record = {"epoch": progress.epoch + 1, "step": progress.global_step,
                  "lr": optimizer.param_groups[0]["lr"], **losses}
        failed = None
        if accelerator.is_main_process:
            evaluating = time.perf_counter()
            try:
                record.update(evaluate_coco(detector, val_split, config.batch_size,
                                            accelerator.device, progress.epoch + 1,
                                            config.epochs))
            except UserError as err:  # a damaged image: keep the epoch's training first
                failed = err
                accelerator.set_trigger()
            record["train_seconds"] = round(evaluating - started, 2)
            record["eval_seconds"] = round(time.perf_counter() - evaluating, 2)
        stopped = accelerator.check_trigger()  # a collective: every process learns of it
        progress.history.append(record)
        progress.epoch, progress.batch = progress.epoch + 1, 0
        if accelerator.is_main_process:
            saved = checkpoint.save(config.output / "checkpoints", progress.global_step,
                                    detector.state_dict(), {"optimizer": optimizer.state_dict()},
                                    progress, config.keep)
            metrics.write_jsonl(config.output / "metrics.jsonl", progress.history)
        if stopped:
            accelerator.wait_for_everyone()
            where = f"; epoch {progress.epoch}'s training is saved in {saved}" \
                if accelerator.is_main_process else ""
            raise UserError(f"evaluation after epoch {progress.epoch} failed: "
                            f"{failed or 'on the main process'}{where} (--resume continues "
                            "after the file is fixed)")
        if accelerator.is_main_process:
            _say(f"epoch {record['epoch']}/{config.epochs}: loss {record['train_loss']:.4f}  "
                 f"mAP {record['mAP']:.4f}  mAP@.5 {record['mAP50']:.4f}  "
                 f"(train {record['train_seconds']:.1f} s, eval {record['eval_seconds']:.1f} s)")
        accelerator.wait_for_everyone()
    out = config.output / "detector.safetensors"
    if accelerator.is_main_process:
        categories = [{"label": i + 1, "id": cid, "name": name} for i, (cid, name) in
                      enumerate(zip(train_split.category_ids, train_split.category_names))]
        save_safetensors_atomic(detector.state_dict(), out, {
            "format": DETECTOR_FORMAT, **info.to_metadata(),
            "backbone_sha256": metadata.get("sha256", ""), "categories": json.dumps(categories),
            "num_classes": str(len(categories) + 1), "min_size": str(config.min_size),
            "max_size": str(config.max_size), "version": __version__,
            "metrics": json.dumps(progress.history[-1] if progress.history else {})})
        _say(f"fine-tuned detector: {out}")
    accelerator.wait_for_everyone()
    return {**(progress.history[-1] if progress.history else {}), "detector": str(out)}

