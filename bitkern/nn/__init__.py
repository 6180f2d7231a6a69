"""Quantized layers: multi-bit (MBN / ABC-Net), binary (XNOR-Net), fixed-point (PACT + DoReFa), pruning,
the packed inference layer they freeze to, and the Precision every compute layer reports."""
from .binary import MBNConv2d, MBNLinear, XNORConv2d, XNORLinear
from .fixed import QConv2d, QLinear
from .packed import PackedMBNConv2d, activation_clamp, fold_into_packed
from .precision import FP, Precision, precision_of
from .prune import kept_fraction, prune_channels_l1, prune_magnitude

__all__ = ["MBNConv2d", "MBNLinear", "XNORConv2d", "XNORLinear", "QConv2d", "QLinear",
           "prune_magnitude", "prune_channels_l1", "kept_fraction", "PackedMBNConv2d", "activation_clamp",
           "fold_into_packed", "Precision", "FP", "precision_of"]
