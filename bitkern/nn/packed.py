"""Packed (frozen) inference layers and the epilogue folding they support.

:class:`PackedMBNConv2d` holds the sign bits of its weight bases pre-packed as int64 [M, Co, KH, KW, Kw]
(no latent float weights) plus alpha / v / beta (and, once folded, a bias and a clamp) as buffers, and
computes through ``bitkern.ops.mbn_conv2d_packed`` (differentiable in the input, so attacks still work).
Trained layers turn themselves into one with ``to_packed()`` (see bitkern/nn/binary.py); bitkern.freeze
drives the conversion and the folding.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from .precision import Precision


class PackedMBNConv2d(nn.Module):
    """Inference-only MBN / XNOR layer with pre-packed weight bases (conv, or linear as a 1x1 conv)."""

    bops_layer = True  # counted by bitkern.bops / bitkern.bitserial (and recognised by bitkern.model_files)

    def __init__(self, w_packed: torch.Tensor, in_channels: int, out_channels: int, kernel_size, stride,
                 padding, alpha: torch.Tensor, v, beta, bias, xnor: bool, is_linear: bool, clamp=None):
        super().__init__()
        # (lo, hi) of a fused activation, applied after the bias (not a buffer: it follows from the
        # architecture, which load_frozen rebuilds).
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.xnor, self.is_linear = bool(xnor), bool(is_linear)
        self.M, self.N = int(w_packed.shape[0]), 1 if v is None else int(v.numel())
        if is_linear:
            self.in_features, self.out_features = self.in_channels, self.out_channels
        self.register_buffer("w_packed", w_packed.contiguous())
        self.register_buffer("alpha", alpha.detach().float().clone().contiguous())
        self.register_buffer("v", None if v is None else v.detach().float().clone().contiguous())
        self.register_buffer("beta", None if beta is None else beta.detach().float().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone().contiguous())

    @property
    def precision(self) -> Precision:
        return Precision("xnor", 1, 1, "binary") if self.xnor else Precision("mbn", self.M, self.N, "binary")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual (conv only): [B, Co, OH, OW], added after the bias and before the clamp."""
        lead = None
        if self.is_linear:
            if residual is not None:
                raise ValueError("residual: not supported by a packed linear layer")
            lead = x.shape[:-1]
            x = x.reshape(-1, self.in_channels, 1, 1)
        out = ops.mbn_conv2d_packed(x, self.w_packed, self.in_channels, self.kernel_size, self.alpha,
                                    self.v, self.beta, self.stride, self.padding, bias=self.bias,
                                    clamp=self.clamp, residual=residual)
        return out.reshape(*lead, self.out_channels) if self.is_linear else out

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.BatchNorm2d) -> None:
        """Absorb an eval-mode BatchNorm2d that follows this layer (exact algebra, float64, then float32)."""
        if self.clamp is not None:
            raise ValueError("fold_batchnorm: this layer already ends in a clamp; a BatchNorm after it "
                             "cannot be folded")
        if bn.running_mean is None or bn.num_features != self.out_channels:
            raise ValueError(f"bn: expected a BatchNorm2d({self.out_channels}) with running statistics, "
                             f"got {bn}")
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if self.bias is not None:
            shift = shift + self.bias.double() * scale
        alpha2d = self.alpha.double().reshape(self.M, -1).expand(self.M, self.out_channels)
        self.alpha = (alpha2d * scale).float().contiguous()
        self.bias = shift.float().contiguous()

    def extra_repr(self) -> str:
        kind = "xnor" if self.xnor else f"mbn M={self.M} N={self.N}"
        clamp = "" if self.clamp is None else f", clamp={self.clamp}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {kind}{', linear' if self.is_linear else ''}{clamp}")


@torch.no_grad()
def pack_bases(bases: torch.Tensor) -> torch.Tensor:
    """float [M, Co, C, KH, KW] -> int64 [M, Co, KH, KW, Kw] via bitkern.ops.pack_signs."""
    return ops.pack_signs(bases.flatten(0, 1).contiguous()).unflatten(0, bases.shape[:2])


@torch.no_grad()
def packed_from_bases(bases: torch.Tensor, alpha, v, beta, bias, *, in_channels: int, out_channels: int,
                      kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), xnor: bool,
                      is_linear: bool = False) -> PackedMBNConv2d:
    """A PackedMBNConv2d from real-valued weight bases [M, Co, C, KH, KW] (their signs are packed)."""
    if isinstance(padding, str):
        raise ValueError(f"freeze: string padding {padding!r} is not supported; use ints")
    return PackedMBNConv2d(pack_bases(bases.float()), in_channels, out_channels, kernel_size, stride, padding,
                           alpha, v, beta, bias, xnor, is_linear)


def activation_clamp(module: nn.Module):
    """(lo, hi) when `module` is an elementwise clamp (Hardtanh, ReLU6, ReLU), else None."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.ReLU):
        return 0.0, math.inf
    return None


def fold_into_packed(conv: nn.Module, bn: nn.Module, act: nn.Module | None = None) -> tuple[bool, bool]:
    """Fold an eval BatchNorm2d `bn` (and `act`, when a clamp) into the packed conv `conv`:
    (bn folded, act folded). Nothing happens (False, False) when `conv` is not a packed conv without a
    clamp yet or `bn` is not a plain BatchNorm2d with running statistics."""
    if not (isinstance(conv, PackedMBNConv2d) and not conv.is_linear and conv.clamp is None
            and type(bn) is nn.BatchNorm2d and bn.running_mean is not None):
        return False, False
    conv.fold_batchnorm(bn)
    clamp = None if act is None else activation_clamp(act)
    if clamp is not None:
        conv.clamp = clamp
    return True, clamp is not None


__all__ = ["PackedMBNConv2d", "pack_bases", "packed_from_bases", "activation_clamp", "fold_into_packed"]
