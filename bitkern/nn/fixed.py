"""Fixed-point layers: PACT activations and DoReFa weights (float torch ops, STE for rounding).

Fixed-point layers run on ordinary float convolutions; only the binary/MBN layers use the packed op.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .precision import Precision
from .._checks import int_in


def check_bits(name: str, value) -> int:
    if not int_in(value, 1, 8):
        raise ValueError(f"{name}: expected an int number of bits in 1..8, got {value!r}")
    return value


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient (straight-through)."""
    return t + (torch.round(t) - t).detach()


def pact_quantize(x: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT: y = clip(x, 0, alpha), quantized to 2^bits - 1 uniform steps on [0, alpha].

    Gradients: d/dx = 1 on 0 <= x < alpha (STE through round); d/dalpha = 1 where x >= alpha (PACT).
    """
    y = torch.minimum(F.relu(x), clip)
    levels = 2 ** bits - 1
    with torch.no_grad():
        scale = levels / clip
        quantized = torch.round(y * scale) / scale
    return y + (quantized - y).detach()


def dorefa_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weights: tanh-normalised to [0, 1], quantized to `bits`, mapped to [-1, 1] (symmetric).

    bits = 1 uses sign(W) * mean|W| with the straight-through gradient (DoReFa / XNOR-Net).
    """
    if bits == 1:
        scale = weight.abs().mean().detach()
        signs = torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
        return (weight + (signs - weight).detach()) * scale
    t = torch.tanh(weight)
    t = t / (2 * t.abs().max().detach().clamp_min(1e-12)) + 0.5
    levels = 2 ** bits - 1
    return 2 * (round_ste(t * levels) / levels) - 1


class _PactInput(nn.Module):
    def _init_quant(self, w_bits: int, a_bits: int, pact_init: float) -> None:
        self.w_bits = check_bits("w_bits", w_bits)
        self.a_bits = check_bits("a_bits", a_bits)
        self.pact_alpha = nn.Parameter(torch.tensor(float(pact_init)))

    @property
    def precision(self) -> Precision:
        return Precision("fixed", self.w_bits, self.a_bits, "fixed")

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return pact_quantize(x, self.pact_alpha, self.a_bits)

    def quant_weight(self) -> torch.Tensor:
        return dorefa_weight(self.weight, self.w_bits)


class QConv2d(nn.Conv2d, _PactInput):
    """Convolution with PACT-quantized unsigned inputs (a_bits) and DoReFa weights (w_bits).

    The PACT clip replaces the ReLU in front of the convolution (inputs below 0 map to 0).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 w_bits: int = 4, a_bits: int = 4, bias: bool = False, pact_init: float = 6.0):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_quant(w_bits, a_bits, pact_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quant_input(x), self.quant_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


class QLinear(nn.Linear, _PactInput):
    """Fully connected layer with PACT inputs and DoReFa weights."""

    def __init__(self, in_features: int, out_features: int, w_bits: int = 4, a_bits: int = 4,
                 bias: bool = True, pact_init: float = 6.0):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._init_quant(w_bits, a_bits, pact_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


__all__ = ["QConv2d", "QLinear", "pact_quantize", "dorefa_weight", "round_ste", "check_bits"]
