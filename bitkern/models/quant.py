"""Quant specs for the models: thin wrappers over the scheme registry (bitkern.quant), kept for the
names bitkern.models.parse_quant / QuantSpec / ACCEPTED and make_conv / activation_for."""
from __future__ import annotations

from torch import nn

from ..quant import ACCEPTED, QuantSpec, parse_quant


def make_conv(spec, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              padding: int = 0) -> nn.Module:
    """A quantized (or fp) conv without bias for the body of a network: the scheme's make_conv."""
    spec = parse_quant(spec)
    return spec.scheme.make_conv(spec, in_channels, out_channels, kernel_size, stride, padding)


def activation_for(spec) -> nn.Module:
    """The body activation of the scheme: ReLU for fp / fixed point (PACT clips its input at 0 anyway);
    Hardtanh for binary and MBN bodies (sign() of a ReLU output would be constant +1, and [-1, 1] matches
    the STE window)."""
    spec = parse_quant(spec)
    return spec.scheme.make_activation(spec)


__all__ = ["QuantSpec", "parse_quant", "make_conv", "activation_for", "ACCEPTED"]
