"""How a training graph runs the sibling copies of a branch stage: the loop, fused first
layers (:mod:`.fused`), one grouped network (:mod:`.packed`), segment-wise recomputation
(:mod:`.recompute`), and the choice among them (:mod:`.executor`).

May import: errors, common, models, surgery. See docs/architecture.md.
"""
from collabsurgery.graphs.execution.executor import EXECUTION_MODES, Executor

__all__ = ["EXECUTION_MODES", "Executor"]
