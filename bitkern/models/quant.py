"""Quantization spec strings: "fp", "pact-w{b}a{b}", "xnor", "mbn{M}x{N}", "prune-weight-{p}", "prune-channel-{p}"."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..nn import MBNConv2d, QConv2d, XNORConv2d

ACCEPTED = ('"fp", "pact-w{b}a{b}" (b in 1..8, e.g. pact-w4a4, pact-w2a4), "xnor", "mbn{M}x{N}" '
            '(M, N in 1..8, e.g. mbn3x1), "prune-weight-{p}" / "prune-channel-{p}" (p = percent pruned, '
            '0..99, e.g. prune-weight-50)')


@dataclass(frozen=True)
class QuantSpec:
    """Parsed quant spec. kind: fp | pact | xnor | mbn | prune-weight | prune-channel."""
    kind: str
    w_bits: int = 32
    a_bits: int = 32
    M: int = 1
    N: int = 1
    prune_percent: int = 0

    def __str__(self) -> str:
        if self.kind == "pact":
            return f"pact-w{self.w_bits}a{self.a_bits}"
        if self.kind == "mbn":
            return f"mbn{self.M}x{self.N}"
        if self.kind.startswith("prune"):
            return f"{self.kind}-{self.prune_percent}"
        return self.kind

    @property
    def binary(self) -> bool:
        return self.kind in ("xnor", "mbn")


def parse_quant(spec) -> QuantSpec:
    """Parse a quant spec string; ValueError listing the accepted forms otherwise."""
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"quant: expected a spec string ({ACCEPTED}), got {type(spec).__name__}")
    text = spec.strip().lower()
    if text in ("fp", "xnor"):
        return QuantSpec(text)
    match = re.fullmatch(r"pact-w(\d+)a(\d+)", text)
    if match:
        w, a = int(match.group(1)), int(match.group(2))
        if 1 <= w <= 8 and 1 <= a <= 8:
            return QuantSpec("pact", w_bits=w, a_bits=a)
        raise ValueError(f"quant: bits out of range in {spec!r} (weights and activations need 1..8); "
                         f"accepted: {ACCEPTED}")
    match = re.fullmatch(r"mbn(\d+)x(\d+)", text)
    if match:
        M, N = int(match.group(1)), int(match.group(2))
        if 1 <= M <= 8 and 1 <= N <= 8:
            return QuantSpec("mbn", w_bits=1, a_bits=1, M=M, N=N)
        raise ValueError(f"quant: number of bases out of range in {spec!r} (M and N need 1..8); "
                         f"accepted: {ACCEPTED}")
    match = re.fullmatch(r"(prune-weight|prune-channel)-(\d+)", text)
    if match:
        percent = int(match.group(2))
        if 0 <= percent <= 99:
            return QuantSpec(match.group(1), prune_percent=percent)
        raise ValueError(f"quant: prune percent out of range in {spec!r} (0..99); accepted: {ACCEPTED}")
    raise ValueError(f"quant: unknown spec {spec!r}; accepted: {ACCEPTED}")


def make_conv(spec: QuantSpec, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              padding: int = 0) -> nn.Module:
    """A quantized (or fp) 3x3/1x1 convolution without bias for the body of a network."""
    if spec.kind == "pact":
        return QConv2d(in_channels, out_channels, kernel_size, stride, padding, w_bits=spec.w_bits,
                       a_bits=spec.a_bits)
    if spec.kind == "xnor":
        return XNORConv2d(in_channels, out_channels, kernel_size, stride, padding)
    if spec.kind == "mbn":
        return MBNConv2d(in_channels, out_channels, kernel_size, stride, padding, M=spec.M, N=spec.N)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)


def activation_for(spec: QuantSpec) -> nn.Module:
    """ReLU for fp / fixed point (PACT clips its input at 0 anyway); Hardtanh for binary and MBN bodies:
    sign() of a ReLU output would be constant +1, and [-1, 1] matches the STE window."""
    return nn.Hardtanh(inplace=False) if spec.binary else nn.ReLU(inplace=False)


__all__ = ["QuantSpec", "parse_quant", "make_conv", "activation_for", "ACCEPTED"]
