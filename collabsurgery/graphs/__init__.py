"""Training graphs built from a backbone."""
from .build import PATTERNS, even_branches, rebuild, splits, wrap
from .execution import EXECUTION_MODES
from .tree import RESCALE_MODES, TreeNet, WrapConfig, scale_grad

__all__ = ["EXECUTION_MODES", "PATTERNS", "RESCALE_MODES", "TreeNet", "WrapConfig",
           "even_branches", "rebuild", "scale_grad", "splits", "wrap"]
