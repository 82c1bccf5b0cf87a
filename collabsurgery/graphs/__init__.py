"""Training graphs built from a backbone, behind one contract (:mod:`.base`).

Importing this package registers every graph kind: ``tree`` and ``instances`` (:mod:`.build`),
``peers`` (:mod:`.peers`), ``routed`` (:mod:`.routed`), ``dropout`` (:mod:`.dropout`).
"""
# importing the builders registers the graph kinds, in this order
from collabsurgery.graphs import build, peers, routed, dropout  # noqa: F401, I001
from collabsurgery.graphs.base import (GRAPH_KINDS, INPUT, CostPiece, GraphConfig, GraphOutput,
                                       TrainingGraph, build_graph, builder_arguments, rebuild,
                                       register_graph)
from collabsurgery.graphs.build import even_branches
from collabsurgery.graphs.dropout import DropoutViews
from collabsurgery.graphs.execution.executor import EXECUTION_MODES
from collabsurgery.graphs.peers import PeerGroup
from collabsurgery.graphs.routed import RoutedNet
from collabsurgery.graphs.staged import StagedGraph
from collabsurgery.graphs.tree import RESCALE_MODES, TreeNet, scale_grad
from collabsurgery.graphs.wrap import splits, wrap

__all__ = ["EXECUTION_MODES", "DropoutViews", "GRAPH_KINDS", "INPUT", "RESCALE_MODES",
           "CostPiece", "GraphConfig", "GraphOutput", "PeerGroup", "RoutedNet", "StagedGraph",
           "TrainingGraph", "TreeNet", "build_graph", "builder_arguments", "even_branches", "rebuild", "register_graph",
           "scale_grad", "splits", "wrap"]
