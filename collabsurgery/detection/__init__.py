"""Fine-tune a torchvision Faster R-CNN (FPN) on an exported backbone, on COCO-format data.

>>> from collabsurgery.detection import FinetuneConfig, finetune
>>> finetune(FinetuneConfig(backbone=Path("r18.safetensors"), train=Path("data/train"),
...                         val=Path("data/val"), output=Path("runs/det")))

The command line is ``collabsurgery finetune-detection`` or ``tools/finetune_detection.py``
(:func:`add_arguments`, :func:`run`).
"""
from collabsurgery.detection.coco import CocoDetection, CocoSplit, collate, load_split, load_splits
from collabsurgery.detection.command import add_arguments, config_from_args, run
from collabsurgery.detection.detector import (DetectorInfo, FeaturesWithFPN, build_detector,
                                              freeze_stages)
from collabsurgery.detection.digits import builtin_digits, write_digits_detection
from collabsurgery.detection.finetune import FinetuneConfig, evaluate_coco, finetune

__all__ = ["CocoDetection", "CocoSplit", "DetectorInfo", "FeaturesWithFPN", "FinetuneConfig",
           "add_arguments", "build_detector", "builtin_digits", "collate", "config_from_args",
           "evaluate_coco", "finetune", "freeze_stages", "load_split", "load_splits", "run",
           "write_digits_detection"]
