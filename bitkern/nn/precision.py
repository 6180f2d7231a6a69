"""The operand precision a compute layer reports, read by BOPS counting, the bit-serial simulator and
the recipes (instead of guessing from class names).

A layer declares it as a ``precision`` property returning a :class:`Precision`; a conv / linear layer
without one is full precision (:data:`FP`, counted at 8 x 8 bits as paper 000 does).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .._checks import int_in

ARITHMETIC = ("float", "fixed", "binary")


@dataclass(frozen=True)
class Precision:
    """Operand precision of one compute layer.

    kind: the label in BOPS / simulator tables ("fp", "fixed", "xnor", "mbn", or a scheme's own).
    w_bits, a_bits: weight / activation bits; for ``arithmetic="binary"`` the number of weight bases M and
        activation bases N.
    arithmetic: "float" (a float layer, counted at w_bits x a_bits = 8 x 8), "fixed" (integer operands of
        w_bits / a_bits bits, computed bit-serially by bitkern.bitserial), "binary" (M x N independent 1-bit
        convolutions: one serial step per MAC each, run in parallel).
    """
    kind: str
    w_bits: int = 8
    a_bits: int = 8
    arithmetic: str = "float"

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"kind: expected a non-empty string, got {self.kind!r}")
        for name in ("w_bits", "a_bits"):
            value = getattr(self, name)
            if not int_in(value, 1, 64):
                raise ValueError(f"{name}: expected an int in 1..64, got {value!r}")
        if self.arithmetic not in ARITHMETIC:
            raise ValueError(f"arithmetic: expected one of {ARITHMETIC}, got {self.arithmetic!r}")

    @property
    def binary(self) -> bool:
        """w_bits x a_bits independent binary convolutions (XNOR / MBN bases)."""
        return self.arithmetic == "binary"

    @property
    def one_bit(self) -> bool:
        """1-bit weights and 1-bit activations (XNOR-Net, MBN 1x1, PACT-w1a1)."""
        return self.arithmetic != "float" and self.w_bits == 1 and self.a_bits == 1

    @property
    def bops_per_mac(self) -> int:
        return self.w_bits * self.a_bits


FP = Precision("fp", 8, 8, "float")


def precision_of(module: nn.Module) -> Precision:
    """The module's declared precision, or FP for a layer that declares none."""
    precision = getattr(module, "precision", None)
    return precision if isinstance(precision, Precision) else FP


__all__ = ["Precision", "FP", "ARITHMETIC", "precision_of"]
