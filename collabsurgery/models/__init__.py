"""Extra model definitions registered in timm's registry on import (``cifar_*``)."""
from .cifar import CifarDenseNet, CifarResNet, CifarWideResNet

__all__ = ["CifarDenseNet", "CifarResNet", "CifarWideResNet"]
