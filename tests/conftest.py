"""Shared helpers for the surgery / graph / export / CLI tests.

Everything runs on CPU with tiny inputs (32 px, batch 2); no network is ever used.
"""
from __future__ import annotations

import os

# timm and huggingface_hub read this when they are imported: loading weights from a local file
# (``pretrained_cfg_overlay=dict(file=...)``) must never try to reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from collabsurgery.objectives import Objective, register_objective  # noqa: E402
from collabsurgery.objectives.base import cross_entropy_per_head  # noqa: E402


def make_input(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A deterministic random image batch ``[batch, 3, size, size]``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal where the op order is identical, else float32 tolerance (DESIGN 3)."""
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def calibrate_batchnorm(net: nn.Module, size: int) -> None:
    """Give every BatchNorm the statistics of one train-mode batch (cumulative average).

    With its initial statistics (mean 0, var 1) eval-mode BatchNorm shrinks some backbones'
    logits to ~1e-10 (torchvision mobilenet_v2), which would make every eval comparison at
    1e-5 vacuous.
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


def one_line_error(stderr: str) -> str:
    """The CLI's error output must be exactly one line, and never a traceback."""
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("collabsurgery: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, unless OMP_NUM_THREADS says otherwise.

    On a small shared CPU machine, two OpenMP threads competing with other processes ran these
    tiny convolutions up to 30x slower than one thread.
    """
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LearntTemperatureCE(Objective):
    """Cross entropy of ``logits / T`` per head, summed; ``T = exp(log_temperature)`` is a
    parameter the objective owns (as gates, attention or auxiliary heads would be: trained,
    checkpointed, never exported)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def head_losses(self, logits, labels, context):
        ce = cross_entropy_per_head(logits / self.log_temperature.exp(), labels)
        return ce, {"hard": ce}


TEST_OBJECTIVE = "test_learnt_temperature"  # recipes select it with objective={name: ...}
register_objective(TEST_OBJECTIVE, LearntTemperatureCE)


@pytest.fixture(scope="module")
def forget_accelerate_state():
    """Leave no mixed-precision setting behind in Accelerate's process-wide state after a
    module's tests (use with ``pytestmark = pytest.mark.usefixtures(...)``)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def latest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The ``model.safetensors`` of a run's latest checkpoint."""
    from safetensors.torch import load_file

    from collabsurgery.rundir import checkpoint

    return load_file(str(checkpoint.latest(Path(run_dir) / "checkpoints") / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state: the same keys, every tensor equal."""
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_in_two_cpu_processes(recipe_file: Path) -> None:
    """``tools/train.py --recipe recipe_file`` under torchrun with 2 CPU processes (as the
    README shows); fails with the processes' output if they do not finish."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(repo / "tools" / "train.py"), "--recipe", str(recipe_file)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]



def load_tool(name: str):
    """``tools/<name>.py`` imported as module ``name`` (tools are scripts, not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def train_step(net: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None
               ) -> torch.Tensor:
    """One training step: forward, a loss that weighs heads differently, backward."""
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = net(x)
    weights = torch.arange(1, logits.shape[0] + 1, dtype=torch.float32).view(-1, 1, 1)
    (logits.float().square() * weights).mean().backward()
    return logits


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, what: str,
                        rtol: float = 1e-4) -> None:
    """allclose with an absolute tolerance relative to ``expected``'s largest value."""
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = expected.abs().max().clamp_min(1e-6).item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


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
