"""Reference helpers shared by the test modules: inputs, plain-Python loss pieces, comparisons,
tiny training recipes and the CLI's exit status.

Test modules import these from here and never from one another; ``conftest.py`` keeps the
fixtures. Comparisons of floating-point results scale with the values compared
(:func:`assert_close_scaled`): a float32 result that differs from its reference in op order
differs by a few ulps of the largest value, which no fixed absolute tolerance bounds.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

#: Float32 results computed in a different op order than their reference agree to this
#: fraction of the largest value compared (a few hundred ulps: sums over a conv's inputs
#: round differently; a wrong weight, head or mask differs by orders of magnitude more).
FLOAT32_RTOL = 1e-5


# ---------------------------------------------------------------------------- inputs

def make_input(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A deterministic random image batch ``[batch, 3, size, size]``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_logits(h: int = 3, b: int = 4, c: int = 5, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic logits ``[h, b, c]`` (spread 2) and labels ``[b]`` for loss references."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, b, c, generator=g) * 2, torch.randint(0, c, (b,), generator=g)


def calibrate_batchnorm(net: nn.Module, size: int) -> None:
    """Give every BatchNorm the statistics of one train-mode batch (cumulative average).

    With its initial statistics (mean 0, var 1) eval-mode BatchNorm shrinks some backbones'
    logits to ~1e-10 (torchvision mobilenet_v2), which would leave eval comparisons comparing
    almost nothing.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(make_input(8, size, seed=99))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


# ---------------------------------------------------------------------------- loss references

def ref_log_softmax(z: list[float], t: float = 1.0) -> list[float]:
    """``log_softmax(z / t)`` with plain Python floats."""
    zs = [v / t for v in z]
    m = max(zs)
    lse = m + math.log(sum(math.exp(v - m) for v in zs))
    return [v - lse for v in zs]


def ref_softmax(z: list[float], t: float = 1.0) -> list[float]:
    """``softmax(z / t)`` with plain Python floats."""
    return [math.exp(v) for v in ref_log_softmax(z, t)]


def ref_kl(p: list[float], log_q: list[float]) -> float:
    """``KL(p || q)`` from probabilities ``p`` and log-probabilities ``log_q``."""
    return sum(pi * (math.log(pi) - lq) for pi, lq in zip(p, log_q))


# ---------------------------------------------------------------------------- comparisons

def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, what: str = "",
                        rtol: float = 1e-4, atol_fraction: float | None = None) -> None:
    """allclose with ``rtol`` per element and an absolute tolerance of ``atol_fraction``
    (default ``rtol``) times ``expected``'s largest magnitude: elements near zero in a tensor
    of large values carry the rounding of the large ones."""
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = expected.abs().max().clamp_min(1e-6).item() if expected.numel() else 1.0
    atol = (rtol if atol_fraction is None else atol_fraction) * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal where the op order is identical, else equal to float32 rounding
    (:data:`FLOAT32_RTOL` of the largest logit; DESIGN 3)."""
    if not torch.equal(actual, expected):
        assert_close_scaled(actual, expected, "logits", rtol=FLOAT32_RTOL)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state: the same keys, every tensor equal."""
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_step(net: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None
               ) -> torch.Tensor:
    """One training step: forward, a loss that weighs heads differently, backward."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = net(x)
    weights = torch.arange(1, logits.shape[0] + 1, dtype=torch.float32).view(-1, 1, 1)
    (logits.float().square() * weights).mean().backward()
    return logits


def assert_same_training_step(other: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """One :func:`train_step` of each gives the same logits, gradients and buffers (BatchNorm
    statistics and ``num_batches_tracked``: updated once)."""
    assert_close_scaled(train_step(other, x), train_step(ref, x), "logits")
    grads = dict(ref.named_parameters())
    for name, p in other.named_parameters():
        assert_close_scaled(p.grad, grads[name].grad, f"grad of {name}")
    buffers = dict(ref.named_buffers())
    for name, b in other.named_buffers():
        assert_close_scaled(b, buffers[name], f"buffer {name}", rtol=1e-5)


# ---------------------------------------------------------------------------- runs and the CLI

#: The training engine kept tiny: the built-in digits at 16 px, 128 examples, 2 epochs of 8
#: steps, cifar_resnet20 with 2 heads split after layer1.
TINY_OVERRIDES = ["data.image_size=16", "data.max_train_examples=128", "train.batch_size=16",
                  "model.name=cifar_resnet20", "graph.heads=2", "graph.split=[layer1]",
                  "run.progress=false", "train.epochs=2"]
#: dropout and label noise: a resume must replay the same masks and noisy labels; a named
#: execution mode (auto times the modes, so two fresh runs may choose differently)
RANDOM_OVERRIDES = ["model.kwargs={drop_rate: 0.2}", "data.label_noise=0.2",
                    "graph.execution=packed"]


def tiny_recipe(run_dir: Path, *overrides: str):
    """The :data:`TINY_OVERRIDES` recipe writing into ``run_dir``, with ``overrides``."""
    from collabsurgery.config.recipe import load_recipe

    return load_recipe(None, [*TINY_OVERRIDES, f"run.dir={run_dir}", *overrides])


def stop_then_resume(make_recipe, run_dir, stop: int, capsys) -> None:
    """Train ``make_recipe(*overrides)`` until optimizer step ``stop`` (a checkpoint there), then
    resume it with ``run.resume=auto`` to the end, checking that it did resume from there."""
    from collabsurgery.rundir import checkpoint
    from collabsurgery.train import engine

    engine.train(make_recipe(f"train.max_steps={stop}"))
    ckpt = run_dir / "checkpoints" / f"ckpt-{stop:08d}"
    assert checkpoint.latest(run_dir / "checkpoints") == ckpt
    capsys.readouterr()
    engine.train(make_recipe("run.resume=auto"))
    assert f"resumed from {ckpt}" in capsys.readouterr().out


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The ``model.safetensors`` of a run's latest checkpoint."""
    from safetensors.torch import load_file

    from collabsurgery.rundir import checkpoint

    return load_file(str(checkpoint.latest(Path(run_dir) / "checkpoints") / "model.safetensors"))


def train_in_two_cpu_processes(recipe_file: Path) -> None:
    """``tools/train.py --recipe recipe_file`` under torchrun with 2 CPU processes (as the
    README shows); fails with the processes' output if they do not finish."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tools" / "train.py"), "--recipe", str(recipe_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_cli(argv) -> int:
    """``collabsurgery.cli.main(argv)``'s exit status; argparse usage errors exit through
    SystemExit."""
    from collabsurgery.cli import main

    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def one_line(stderr: str) -> str:
    """What the CLI says when it stops must be exactly one line, and never a traceback."""
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def one_line_error(stderr: str) -> str:
    """The CLI's error output must be exactly one line, never a traceback, and say error."""
    line = one_line(stderr)
    assert line.startswith("collabsurgery: error: "), stderr
    return line


def load_tool(name: str):
    """``tools/<name>.py`` imported as module ``name`` (tools are scripts, not a package)."""
    import importlib.util
    path = REPO / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def lock_held_by_the_os(run_dir: Path) -> bool:
    """Whether the kernel says some process holds ``run_dir``'s run lock: a fresh descriptor's
    exclusive flock fails. Independent of :func:`collabsurgery.rundir.lock.is_held`, which also
    trusts this process's own record of what it holds (the tests check the lock against this)."""
    import fcntl
    import os

    from collabsurgery.rundir.lock import LOCK_FILE

    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
