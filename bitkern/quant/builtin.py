"""The built-in quant schemes, one class each: fp, pact (PACT activations + DoReFa weights), xnor, mbn,
prune-weight, prune-channel. Registered on import of bitkern.quant, in this order."""
from __future__ import annotations

import re

from torch import nn

from ..nn import MBNConv2d, QConv2d, XNORConv2d, prune_channels_l1, prune_magnitude
from ..nn.precision import FP, Precision
from .registry import QuantScheme, QuantSpec, register_scheme


class FullPrecision(QuantScheme):
    """fp: plain float convolutions (counted at 8 x 8 bits, as in the paper)."""
    name = "fp"
    forms = '"fp"'

    def method_name(self, spec):
        return "FP"


class Pact(QuantScheme):
    """pact-w{b}a{b}: PACT-clipped unsigned activations (a bits) and DoReFa weights (w bits), QConv2d."""
    name = "pact"
    forms = '"pact-w{b}a{b}" (b in 1..8, e.g. pact-w4a4, pact-w2a4)'

    def parse(self, text):
        match = re.fullmatch(r"pact-w(\d+)a(\d+)", text)
        if not match:
            return None
        w, a = int(match.group(1)), int(match.group(2))
        if not (1 <= w <= 8 and 1 <= a <= 8):
            raise ValueError(f"bits out of range in {text!r} (weights and activations need 1..8)")
        return QuantSpec("pact", w_bits=w, a_bits=a)

    def format(self, spec):
        return f"pact-w{spec.w_bits}a{spec.a_bits}"

    def make_conv(self, spec, in_channels, out_channels, kernel_size, stride=1, padding=0):
        return QConv2d(in_channels, out_channels, kernel_size, stride, padding, w_bits=spec.w_bits,
                       a_bits=spec.a_bits)

    def precision(self, spec):
        return Precision("fixed", spec.w_bits, spec.a_bits, "fixed")

    def method_name(self, spec):
        w, a = spec.w_bits, spec.a_bits
        return f"PACT-{w}" if w == a else f"PACT-{w}-{a}"


class Xnor(QuantScheme):
    """xnor: XNOR-Net, sign weights scaled by mean|W| and sign activations; freezes to PackedMBNConv2d."""
    name = "xnor"
    forms = '"xnor"'
    binary = True

    def make_conv(self, spec, in_channels, out_channels, kernel_size, stride=1, padding=0):
        return XNORConv2d(in_channels, out_channels, kernel_size, stride, padding)

    def precision(self, spec):
        return Precision("xnor", 1, 1, "binary")

    def method_name(self, spec):
        return "XNOR-Net"


class Mbn(QuantScheme):
    """mbn{M}x{N}: ABC-Net multi-bit network, M weight bases x N activation bases; freezes to
    PackedMBNConv2d."""
    name = "mbn"
    forms = '"mbn{M}x{N}" (M, N in 1..8, e.g. mbn3x1)'
    binary = True

    def parse(self, text):
        match = re.fullmatch(r"mbn(\d+)x(\d+)", text)
        if not match:
            return None
        M, N = int(match.group(1)), int(match.group(2))
        if not (1 <= M <= 8 and 1 <= N <= 8):
            raise ValueError(f"number of bases out of range in {text!r} (M and N need 1..8)")
        return QuantSpec("mbn", w_bits=1, a_bits=1, M=M, N=N)

    def format(self, spec):
        return f"mbn{spec.M}x{spec.N}"

    def make_conv(self, spec, in_channels, out_channels, kernel_size, stride=1, padding=0):
        return MBNConv2d(in_channels, out_channels, kernel_size, stride, padding, M=spec.M, N=spec.N)

    def precision(self, spec):
        return Precision("mbn", spec.M, spec.N, "binary")

    def method_name(self, spec):
        return f"MBN {spec.M}x{spec.N}"


class _Prune(QuantScheme):
    """Full-precision layers with a pruning mask applied when the model is built."""
    label = ""

    def parse(self, text):
        match = re.fullmatch(rf"{self.name}-(\d+)", text)
        if not match:
            return None
        percent = int(match.group(1))
        if not 0 <= percent <= 99:
            raise ValueError(f"prune percent out of range in {text!r} (0..99)")
        return QuantSpec(self.name, prune_percent=percent)

    def format(self, spec):
        return f"{self.name}-{spec.prune_percent}"

    def sparsity(self, spec):
        return spec.prune_percent / 100

    def precision(self, spec):
        return FP

    def method_name(self, spec):
        return f"{self.label} {spec.prune_percent}%"


class PruneWeight(_Prune):
    """prune-weight-{p}: magnitude (unstructured) pruning of p % of every conv and linear layer's weights."""
    name = "prune-weight"
    forms = '"prune-weight-{p}" (p = percent of weights pruned, 0..99, e.g. prune-weight-50)'
    label = "W. Pr."

    def finish_model(self, spec, model: nn.Module) -> nn.Module:
        return prune_magnitude(model, spec.prune_percent / 100)


class PruneChannel(_Prune):
    """prune-channel-{p}: L1 filter pruning of p % of every conv layer's output channels."""
    name = "prune-channel"
    forms = '"prune-channel-{p}" (p = percent of conv filters pruned, 0..99)'
    label = "Ch. Pr."

    def finish_model(self, spec, model: nn.Module) -> nn.Module:
        return prune_channels_l1(model, spec.prune_percent / 100)


BUILTIN_SCHEMES = (FullPrecision, Pact, Xnor, Mbn, PruneWeight, PruneChannel)
for _cls in BUILTIN_SCHEMES:
    register_scheme(_cls)

__all__ = ["FullPrecision", "Pact", "Xnor", "Mbn", "PruneWeight", "PruneChannel", "BUILTIN_SCHEMES"]
