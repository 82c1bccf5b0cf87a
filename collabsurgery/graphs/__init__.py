"""Training graphs built from a backbone, behind one contract (:mod:`.base`).

Importing this package registers every graph kind: ``tree`` and ``instances`` (:mod:`.build`),
``peers`` (:mod:`.peers`), ``routed`` (:mod:`.routed`), ``dropout`` (:mod:`.dropout`).
"""
from . import build, peers, routed, dropout  # noqa: F401, I001  (registers the kinds, in this order)
from .base import (GRAPH_KINDS, INPUT, CostPiece, GraphConfig, GraphOutput, TrainingGraph,
                   build_graph, builder_arguments, rebuild, register_graph)
from .build import even_branches
from .execution import EXECUTION_MODES
from .dropout import DropoutViews
from .peers import PeerGroup
from .routed import RoutedNet
from .staged import StagedGraph
from .tree import RESCALE_MODES, TreeNet, scale_grad
from .wrap import splits, wrap

__all__ = ["EXECUTION_MODES", "DropoutViews", "GRAPH_KINDS", "INPUT", "RESCALE_MODES", "CostPiece",
           "GraphConfig", "GraphOutput", "PeerGroup", "RoutedNet", "StagedGraph", "TrainingGraph", "TreeNet",
           "build_graph", "builder_arguments", "even_branches", "rebuild", "register_graph",
           "scale_grad", "splits", "wrap"]
