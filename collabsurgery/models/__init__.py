"""Extra model definitions registered in timm's registry on import (``cifar_*``)."""
from .cifar import CifarDenseNet, CifarResNet, CifarWideResNet
from .cifar_vgg import CifarVGG

__all__ = ["CifarDenseNet", "CifarResNet", "CifarVGG", "CifarWideResNet"]
