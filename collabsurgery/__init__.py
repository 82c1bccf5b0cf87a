"""collabsurgery: collaborative learning on any timm or torchvision backbone.

>>> import collabsurgery as cs
>>> cs.splits("resnet50")[:3]                     # clean split points, in execution order
>>> net = cs.wrap("resnet50", split="layer2,layer3", heads=4)
>>> net(x).shape                                  # [H, B, C], head 0 first
>>> peers = cs.wrap(["resnet18", "torchvision.mobilenet_v2"], pattern="peers", num_classes=10)
>>> cs.export(net, head=0, path="resnet50_cl.safetensors")
>>> model = cs.load_backbone("resnet50_cl.safetensors")
"""
from collabsurgery.common import __version__
from collabsurgery.errors import UserError
from collabsurgery.export import export, load_backbone
from collabsurgery.graphs import (GraphConfig, GraphOutput, TrainingGraph, TreeNet, rebuild,
                                  register_graph, splits, wrap)

__all__ = ["GraphConfig", "GraphOutput", "TrainingGraph", "TreeNet", "UserError", "__version__",
           "export", "load_backbone", "rebuild", "register_graph", "splits", "wrap"]
