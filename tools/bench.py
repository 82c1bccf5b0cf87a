"""Benchmark a training graph against the plain model (same as ``collabsurgery bench``).

    python tools/bench.py resnet50 --split layer2,layer3 --heads 4 --image-size 224 --batch-size 16
    python tools/bench.py cifar_resnet20 --split layer1 --heads 2 --image-size 32 --json
"""
import sys

from collabsurgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
