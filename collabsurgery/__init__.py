"""collabsurgery: collaborative learning on any timm or torchvision backbone.

>>> import collabsurgery as cs
>>> cs.splits("resnet50")[:3]                     # clean split points, in execution order
>>> net = cs.wrap("resnet50", split="layer2,layer3", heads=4)
>>> net(x).shape                                  # [H, B, C], head 0 first
>>> peers = cs.wrap(["resnet18", "torchvision.mobilenet_v2"], pattern="peers", num_classes=10)
>>> cs.export(net, head=0, path="resnet50_cl.safetensors")
>>> model = cs.load_backbone("resnet50_cl.safetensors")

The public names are imported on first use, so ``import collabsurgery`` (and the command line's
``--help``) does not import torch.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from collabsurgery.common import __version__
from collabsurgery.errors import UserError

if TYPE_CHECKING:
    from collabsurgery.export import export, load_backbone
    from collabsurgery.graphs import (GraphConfig, GraphOutput, TrainingGraph, TreeNet, rebuild,
                                      register_graph, splits, wrap)

#: public name -> the module that defines it
_PUBLIC = {"export": "collabsurgery.export", "load_backbone": "collabsurgery.export",
           **{name: "collabsurgery.graphs" for name in (
               "GraphConfig", "GraphOutput", "TrainingGraph", "TreeNet", "rebuild",
               "register_graph", "splits", "wrap")}}

__all__ = ["GraphConfig", "GraphOutput", "TrainingGraph", "TreeNet", "UserError", "__version__",
           "export", "load_backbone", "rebuild", "register_graph", "splits", "wrap"]


def __getattr__(name: str) -> Any:
    """A public name, imported when first asked for (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'collabsurgery' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


class _Package(types.ModuleType):
    """``collabsurgery.export`` is the function ``cs.export``, although a subpackage has that
    name too: importing a subpackage sets it as an attribute of its parent, which would
    replace the function, so that attribute is a property that always gives the function."""

    @property
    def export(self) -> Any:
        return importlib.import_module("collabsurgery.export").export

    @export.setter
    def export(self, value: Any) -> None:  # the import system setting the subpackage
        pass


sys.modules[__name__].__class__ = _Package
