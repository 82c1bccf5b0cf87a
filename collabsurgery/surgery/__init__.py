"""Surgery: trace a backbone, find clean split points, cut it into stages."""
from collabsurgery.surgery.cuts import (clean_cuts, cut_graph, resolve_splits, split_points,
                                        valid_list)
from collabsurgery.surgery.stage import Stage
from collabsurgery.surgery.trace import TracedGraph, TracedModel, trace, tracer_kwargs

__all__ = ["Stage", "TracedGraph", "TracedModel", "clean_cuts", "cut_graph", "resolve_splits",
           "split_points", "trace", "tracer_kwargs", "valid_list"]
