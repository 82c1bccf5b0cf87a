"""Methods train as their authors did unless a recipe says otherwise: ONE's and OKDDip's graphs
have no backpropagation rescaling (Lan et al.'s ONE code; DefangChen/OKDDip train_GL.py sums the
branch losses unscaled), while CL-ILR keeps paper 000's rescaling."""
from __future__ import annotations

import pytest
import torch

from collabsurgery.config.recipe import load_recipe
from collabsurgery.train.engine import build_net
from helpers import make_input

BRANCHES = 3
ONE = ("model.name=cifar_resnet20", "data.image_size=16",
       f"graph={{pattern: tree, heads: {BRANCHES}, split: [layer2]}}")
OKDDIP = ("model.name=cifar_resnet20", "data.image_size=16",
          "graph={pattern: tree, heads: 4, split: [layer2, global_pool], branches: [4, 1]}")


def trunk_gradient_norm(*overrides: str) -> float:
    """The norm of the trunk's gradient (the stem's convolution) for the sum of every head's
    logits, on a fixed batch, with seeded weights."""
    torch.manual_seed(0)
    net = build_net(load_recipe(None, overrides), num_classes=10)
    net(make_input(2, 16)).sum().backward()
    trunk = dict(net.named_parameters())
    stem = next(p for name, p in trunk.items() if "conv1" in name and p.grad is not None)
    return stem.grad.norm().item()


@pytest.mark.parametrize("setup, name", [(ONE, "one"), (OKDDIP, "okddip")])
def test_one_and_okddip_default_to_no_rescaling(setup, name):
    recipe = load_recipe(None, [*setup, f"objective.name={name}"])
    assert recipe.graph.args["rescale"] == "none"
    unscaled = trunk_gradient_norm(*setup, f"objective.name={name}")
    rescaled = trunk_gradient_norm(*setup, f"objective.name={name}", "graph.rescale=backprop")
    plain = trunk_gradient_norm(*setup, f"objective.name={name}", "graph.rescale=none")
    assert unscaled == pytest.approx(plain, rel=1e-6)
    # backprop rescaling divides the trunk's gradient by the fan-out at the split (3 or 4)
    assert rescaled / unscaled < 0.5


def test_a_recipe_still_chooses_rescaling_and_clilr_keeps_it():
    assert load_recipe(None, [*ONE, "objective.name=one", "graph.rescale=backprop"]
                       ).graph.args["rescale"] == "backprop"
    clilr = build_net(load_recipe(None, [*ONE, "objective.name=consensus"]), num_classes=10)
    assert clilr.config.args["rescale"] == "backprop"
