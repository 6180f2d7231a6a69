"""Model zoo: CIFAR ResNet-20/32/44/56 and ImageNet ResNet-18 for every quant spec."""
from .quant import ACCEPTED, QuantSpec, parse_quant
from .resnet import ARCHS, QuantResNet, create, resnet18, resnet20, resnet32, resnet44, resnet56

__all__ = ["create", "parse_quant", "QuantSpec", "QuantResNet", "ARCHS", "ACCEPTED",
           "resnet18", "resnet20", "resnet32", "resnet44", "resnet56"]
