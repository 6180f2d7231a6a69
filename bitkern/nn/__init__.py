"""Quantized layers: multi-bit (MBN / ABC-Net), binary (XNOR-Net), fixed-point (PACT + DoReFa), pruning."""
from .binary import MBNConv2d, MBNLinear, XNORConv2d, XNORLinear
from .fixed import QConv2d, QLinear
from .prune import kept_fraction, prune_channels_l1, prune_magnitude

__all__ = ["MBNConv2d", "MBNLinear", "XNORConv2d", "XNORLinear", "QConv2d", "QLinear",
           "prune_magnitude", "prune_channels_l1", "kept_fraction"]
