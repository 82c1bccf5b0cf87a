"""How wide a minimum a model sits in: test accuracy under Gaussian noise on its weights
(paper 002, "Model Generalization Analysis", Fig. 6).

The paper: "we first generate different magnitudes of perturbations drawn from independent
Gaussian distribution with variable standard deviation sigma, and then add them to the model
parameters. In Figure 6, we plot the accuracy drop under different perturbation magnitudes."
Read here as:

- what is perturbed: every parameter (``model.parameters()``: convolution and linear weights
  and biases, normalisation scales and shifts), each element with its own independent draw.
  BatchNorm running mean/variance are buffers, not parameters: they are left as trained (they
  are statistics of the data, not weights that training moved into a minimum);
- sigma is absolute, the same for every tensor: the paper names one sigma and no scaling by a
  tensor's magnitude (so curves compare models of one architecture, as Fig. 6 does);
- draws: the paper does not say; each sigma is drawn ``draws`` times (default 5) and the mean
  and sample standard deviation over draws are reported, with the drop = unperturbed accuracy
  minus the mean;
- the model is evaluated in eval mode (running statistics, no dropout) on the test split.

Draw ``d`` at ``sigma`` comes from a CPU ``torch.Generator`` seeded by ``(seed, sigma, d)``,
never from the global RNG, so it is the same noise on any device, in any process, and whichever
other sigmas are asked for. The weights are restored bit-exactly after every draw.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from collabsurgery.common import atomic
from collabsurgery.common.seeding import generator
from collabsurgery.errors import UserError
from collabsurgery.rundir.metrics import pyplot, save_figure

DEFAULT_DRAWS = 5


#: noise is drawn in float32 as N(0, 1) times sigma; no draw of any realistic count exceeds
#: this many sigmas, so below finfo.max / this the noise stays finite
_SIGMAS_OF_NOISE = 10.0


def check_sigmas(sigmas: Sequence[float], dtype: torch.dtype | None = None
                 ) -> tuple[float, ...]:
    """``sigmas`` as floats, or a UserError unless there is at least one and each is finite and
    > 0 and, given the weights' ``dtype``, small enough that the noise is finite in it."""
    values = tuple(float(s) for s in sigmas)
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if not values or bad:
        raise UserError(f"sigma {bad[0] if bad else 'list'} is not valid; valid: one or more "
                        "finite numbers > 0, e.g. 0.01,0.02,0.05")
    if dtype is not None and dtype.is_floating_point:
        largest = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
        limit = largest / _SIGMAS_OF_NOISE
        over = [s for s in values if s > limit]
        if over:
            name = str(dtype).removeprefix("torch.")
            raise UserError(f"sigma {over[0]:g} overflows the model's {name} weights (noise of "
                            f"that size is not finite: the largest {name} is {largest:.3g}); "
                            f"valid: sigmas up to {limit:.3g}, e.g. 0.01,0.02,0.05")
    return values


def weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of ``model``'s parameters (the narrowest, if mixed); None if none."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).max) if dtypes else None


def noise_generator(seed: int, sigma: float, draw: int) -> torch.Generator:
    """The CPU generator of draw ``draw`` at ``sigma``."""
    return generator("perturb", seed, float(sigma), draw)


@contextmanager
def perturbed(model: nn.Module, sigma: float, noise: torch.Generator) -> Iterator[nn.Module]:
    """Within the block every parameter of ``model`` has i.i.d. ``N(0, sigma^2)`` noise added
    (drawn on the CPU from ``noise``, in parameter order); afterwards the whole state,
    parameters and buffers, is put back bit-exactly, also when the block raises."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=noise) * sigma).to(p))
        yield model
    finally:
        model.load_state_dict(saved)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of a plain classifier (logits ``[B, C]``) over ``loader``, in eval mode,
    on the device of its parameters."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(-1).cpu() == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / total


def perturbation_curve(model: nn.Module, loader: DataLoader, sigmas: Sequence[float],
                       draws: int = DEFAULT_DRAWS, seed: int = 0) -> dict[str, Any]:
    """Accuracy of ``model`` on ``loader`` unperturbed and under each sigma (see the module
    docstring for the protocol); ``model`` is unchanged afterwards.

    Returns (JSON-ready) ``{"seed", "draws", "clean_acc", "curve": [{"sigma", "mean_acc",
    "std_acc", "drop", "accs"}, ...]}``, ``accs`` being the accuracy of every draw.
    """
    sigmas = check_sigmas(sigmas, weights_dtype(model))
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise UserError(f"draws {draws!r} is not valid; valid: an integer >= 1")
    clean = accuracy(model, loader)
    curve = []
    for sigma in sigmas:
        accs = []
        for draw in range(draws):
            with perturbed(model, sigma, noise_generator(seed, sigma, draw)):
                accs.append(accuracy(model, loader))
        mean = statistics.fmean(accs)
        curve.append({"sigma": sigma, "mean_acc": mean,
                      "std_acc": statistics.stdev(accs) if draws > 1 else 0.0,
                      "drop": clean - mean, "accs": accs})
    return {"seed": seed, "draws": draws, "clean_acc": clean, "curve": curve}


def format_table(result: Mapping[str, Any]) -> str:
    """A result of :func:`perturbation_curve` as aligned text, one row per sigma."""
    lines = [f"{'sigma':>10} {'test acc':>9} {'std':>7} {'drop':>7}",
             f"{0:>10g} {result['clean_acc']:>9.4f}"]
    lines += [f"{c['sigma']:>10g} {c['mean_acc']:>9.4f} {c['std_acc']:>7.4f} {c['drop']:>7.4f}"
              for c in result["curve"]]
    return "\n".join(lines)


def plot_robustness(results: Mapping[str, Mapping[str, Any]], path: Path,
                    title: str = "test accuracy under Gaussian noise on the weights") -> Path:
    """Test accuracy against sigma, one line per labelled result of :func:`perturbation_curve`
    (starting from the unperturbed accuracy at sigma 0), with a band of +-1 std over draws."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, result in results.items():
        sigmas = [0.0] + [c["sigma"] for c in result["curve"]]
        mean = [result["clean_acc"]] + [c["mean_acc"] for c in result["curve"]]
        std = [0.0] + [c["std_acc"] for c in result["curve"]]
        (line,) = ax.plot(sigmas, mean, marker="o", label=label)
        ax.fill_between(sigmas, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="sigma of the Gaussian noise added to every parameter",
           ylabel="test accuracy", title=title)
    return save_figure(fig, ax, path)


def save_robustness(result: Mapping[str, Any], directory: Path, label: str
                    ) -> tuple[Path, Path]:
    """Write ``robustness.json`` and ``robustness.png`` (its line labelled ``label``) into
    ``directory``, each atomically."""
    png = plot_robustness({label: result}, directory / "robustness.png")
    data = json.dumps(result, indent=1, sort_keys=True)
    return atomic.write_text(directory / "robustness.json", data), png
