"""Training entry point for ``accelerate launch`` and ``torchrun``.

    accelerate launch tools/train.py --recipe recipes/demo.yaml train.epochs=1
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tools/train.py --recipe ...
"""
import sys

from collabsurgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
