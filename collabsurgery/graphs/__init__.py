"""Training graphs built from a backbone."""
from .build import PATTERNS, even_branches, rebuild, splits, wrap
from .tree import RESCALE_MODES, TreeNet, WrapConfig, scale_grad

__all__ = ["PATTERNS", "RESCALE_MODES", "TreeNet", "WrapConfig", "even_branches", "rebuild",
           "scale_grad", "splits", "wrap"]
