"""Extra model definitions registered in timm's registry on import (``cifar_*``)."""
from collabsurgery.models.cifar import CifarDenseNet, CifarResNet, CifarWideResNet
from collabsurgery.models.cifar_vgg import CifarVGG

__all__ = ["CifarDenseNet", "CifarResNet", "CifarVGG", "CifarWideResNet"]
