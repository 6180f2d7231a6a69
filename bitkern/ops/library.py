"""The ops, declared once with torch.library (namespace "bitkern"): real implementations that run on the
backend bitkern.dispatch picks, and fake implementations for meta / fake tensors (torch.compile,
opcheck). Arguments arrive validated (bitkern.ops.validate); the autograd formulas are in
bitkern.ops.autograd."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _bitmath, _checks, dispatch
from ..backends.base import ConvArgs, run_conv_with_epilogue


def conv_args(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, *, want_pairs=False,
              bias=None, clamp=None, residual=None) -> ConvArgs:
    """The backend contract's arguments from validated op arguments (converted, not re-checked)."""
    kernel_size, stride, padding = tuple(kernel_size), tuple(stride), tuple(padding)
    alpha2d = None
    if alpha is not None:
        alpha2d = _bitmath.alpha2d(alpha, *w_packed.shape[:2])
        if beta is None:
            beta = torch.ones(1 if v is None else v.numel(), device=x.device)
        beta = beta.float().contiguous()
    return ConvArgs(
        x=_bitmath.binarizable(x, v is None), w_packed=w_packed.contiguous(),
        v=None if v is None else v.float().contiguous(), alpha2d=alpha2d,
        beta=beta if alpha is not None else None,
        bias=None if bias is None else bias.float().contiguous(),
        residual=None if residual is None else residual.float(),
        clamp=None if clamp is None else (float(clamp[0]), float(clamp[1])),
        want_pairs=want_pairs, kernel_size=kernel_size, stride=stride, padding=padding,
        out_size=_checks.conv_output_size(x.shape, kernel_size, stride, padding))


def pack_weight_bases(w_bases: Tensor) -> Tensor:
    """float [M, Co, C, KH, KW] -> int64 [M, Co, KH, KW, Kw] on the backend for w_bases' device."""
    backend = dispatch.backend_for(w_bases.device)
    packed = backend.run_pack(_bitmath.binarizable(w_bases.flatten(0, 1)).contiguous(), "sign", 0.0)
    return packed.unflatten(0, w_bases.shape[:2])


def run_mbn(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias=None, clamp=None,
            residual=None) -> Tensor:
    """out = clamp((sum_{m,n} alpha beta conv_mn + bias) + residual, *clamp), rounded in that order (the
    backend fuses what its capabilities declare; the rest is applied in torch in the same order)."""
    args = conv_args(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias=bias,
                     clamp=clamp, residual=residual)
    out, _ = run_conv_with_epilogue(dispatch.backend_for(x.device), args)
    return out.contiguous(memory_format=torch.channels_last)


def _empty_channels_last(shape, dtype, device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def _out_size(x: Tensor, kernel_size, stride, padding) -> tuple[int, int]:
    """Output size for the fake kernels (symbolic shapes: no validation here)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1


@torch.library.custom_op("bitkern::pack_signs", mutates_args=())
def pack_signs_op(x: Tensor) -> Tensor:
    return dispatch.backend_for(x.device).run_pack(_bitmath.binarizable(x), "sign", 0.0)


@pack_signs_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3], -(-x.shape[1] // 64)), dtype=torch.int64)


@torch.library.custom_op("bitkern::binary_conv2d", mutates_args=())
def binary_conv2d_op(x: Tensor, w: Tensor, stride: list[int], padding: list[int]) -> Tensor:
    backend = dispatch.backend_for(x.device)
    w_packed = backend.run_pack(_bitmath.binarizable(w).contiguous(), "sign", 0.0).unsqueeze(0)
    args = conv_args(x, w_packed, w.shape[1], w.shape[2:], None, None, None, stride, padding,
                     want_pairs=True)
    _, pairs = backend.run_conv(args)
    return pairs[0, 0].contiguous(memory_format=torch.channels_last)


@binary_conv2d_op.register_fake
def _(x, w, stride, padding):
    oh, ow = _out_size(x, w.shape[2:], stride, padding)
    return _empty_channels_last((x.shape[0], w.shape[0], oh, ow), torch.int32, x.device)


@torch.library.custom_op("bitkern::mbn_pair_counts", mutates_args=())
def mbn_pair_counts_op(x: Tensor, w_packed: Tensor, in_channels: int, kernel_size: list[int],
                       v: Optional[Tensor], stride: list[int], padding: list[int]) -> Tensor:
    """Exact per-pair +-1 convolutions, int32 [M, N, B, Co, OH, OW] (used by the alpha/beta gradients)."""
    args = conv_args(x, w_packed, in_channels, kernel_size, None, v, None, stride, padding, want_pairs=True)
    _, pairs = dispatch.backend_for(x.device).run_conv(args)
    return pairs.contiguous()


@mbn_pair_counts_op.register_fake
def _(x, w_packed, in_channels, kernel_size, v, stride, padding):
    oh, ow = _out_size(x, kernel_size, stride, padding)
    num_act = 1 if v is None else v.shape[0]
    return x.new_empty((w_packed.shape[0], num_act, x.shape[0], w_packed.shape[1], oh, ow),
                       dtype=torch.int32)


@torch.library.custom_op("bitkern::mbn_conv2d", mutates_args=())
def mbn_conv2d_op(x: Tensor, w_bases: Tensor, alpha: Tensor, v: Optional[Tensor], beta: Tensor,
                  stride: list[int], padding: list[int]) -> Tensor:
    return run_mbn(x, pack_weight_bases(w_bases), w_bases.shape[2], w_bases.shape[3:], alpha, v, beta,
                   stride, padding)


@mbn_conv2d_op.register_fake
def _(x, w_bases, alpha, v, beta, stride, padding):
    oh, ow = _out_size(x, w_bases.shape[3:], stride, padding)
    return _empty_channels_last((x.shape[0], w_bases.shape[1], oh, ow), torch.float32, x.device)


@torch.library.custom_op("bitkern::mbn_conv2d_packed", mutates_args=())
def mbn_conv2d_packed_op(x: Tensor, w_packed: Tensor, in_channels: int, kernel_size: list[int],
                         alpha: Tensor, v: Optional[Tensor], beta: Tensor, stride: list[int],
                         padding: list[int], bias: Optional[Tensor] = None,
                         clamp: Optional[list[float]] = None, residual: Optional[Tensor] = None) -> Tensor:
    return run_mbn(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias, clamp,
                   residual)


@mbn_conv2d_packed_op.register_fake
def _(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias=None, clamp=None,
      residual=None):
    oh, ow = _out_size(x, kernel_size, stride, padding)
    return _empty_channels_last((x.shape[0], w_packed.shape[1], oh, ow), torch.float32, x.device)
