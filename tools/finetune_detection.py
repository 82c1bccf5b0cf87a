"""Fine-tune a Faster R-CNN (FPN) on an exported backbone; the entry point for ``accelerate
launch`` and ``torchrun`` (same options as ``collabsurgery finetune-detection``).

    python tools/finetune_detection.py --backbone r18.safetensors --epochs 2
    accelerate launch tools/finetune_detection.py --backbone r18.safetensors --data DIR
"""
import sys

from collabsurgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune-detection", *sys.argv[1:]]))
