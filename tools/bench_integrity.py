"""What integrity costs: checksummed, synced, atomic files against plain safetensors calls.

    python tools/bench_integrity.py                    # resnet50 weights (about 100 MB)
    python tools/bench_integrity.py --model resnet18 --repeats 5

Measured in one process, each figure the median of ``--repeats`` (plain and ours back to back):

- export save: ``safetensors.torch.save_file`` vs :func:`collabsurgery.common.tensorfile.save_safetensors_atomic`
  (SHA-256 of tensors and metadata, temp file, fsync, rename, directory fsync);
- export load: ``load_file`` vs :func:`collabsurgery.common.tensorfile.load_state` (checksum verified);
- checkpoint save: weights + ``torch.save`` of SGD momentum state vs :func:`checkpoint.save`
  (pickle-free state files, file hashes in state.json, read back and verified before the rename);
- checkpoint load: ``load_file`` + ``torch.load`` vs :func:`checkpoint.load` (every hash checked).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from collabsurgery.common.tensorfile import load_state, save_safetensors_atomic
from collabsurgery.rundir import checkpoint


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = timm.create_model(args.model, pretrained=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    states = {"optimizer": optimizer.state_dict()}
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 2**20

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain_ckpt = root / "plain-ckpt"
        plain_ckpt.mkdir()

        def plain_checkpoint_save():
            save_file(state, str(plain_ckpt / "model.safetensors"))
            torch.save(states["optimizer"], plain_ckpt / "optimizer.pt")

        def plain_checkpoint_load():
            load_file(str(plain_ckpt / "model.safetensors"))
            torch.load(plain_ckpt / "optimizer.pt", weights_only=True)

        rows = {
            "export save": (lambda: save_file(state, str(root / "a.safetensors")),
                            lambda: save_safetensors_atomic(state, root / "b.safetensors", {})),
            "export load": (lambda: load_file(str(root / "a.safetensors")),
                            lambda: load_state(root / "b.safetensors")),
            "checkpoint save": (plain_checkpoint_save, lambda: checkpoint.save(
                root / "ckpts", 1, state, states, checkpoint.Progress(), keep=1)),
            "checkpoint load": (plain_checkpoint_load,
                                lambda: checkpoint.load(root / "ckpts" / "ckpt-00000001")),
        }
        print(f"{args.model}: {megabytes:.0f} MB of weights, {torch.get_num_threads()} threads")
        print(f"{'':18}{'plain ms':>10}{'ours ms':>10}{'ratio':>8}")
        for name, (plain, ours) in rows.items():
            a, b = median_seconds(plain, args.repeats), median_seconds(ours, args.repeats)
            print(f"{name:18}{a * 1e3:>10.0f}{b * 1e3:>10.0f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()
