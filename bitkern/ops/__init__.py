"""bitkern's operators, declared once with torch.library (namespace "bitkern").

Each op has a real implementation that asks bitkern.dispatch for a backend (C++ / CUDA / Triton / pure
torch), a fake implementation for meta/fake tensors (torch.compile, opcheck) and, where the output is
differentiable, an autograd formula: the straight-through estimator (STE) of paper 000 Eq. 3.
Modules: library (the op declarations and fakes), autograd (the STE backward), ste (the STE window and
its modes), validate (argument checks, made once here before dispatch), eager (the plain-eager fast path).

Public wrappers (validate, then call the op):
  pack_signs(x)                                         -> int64 packed signs
  binary_conv2d(x, w, stride=1, padding=0)              -> int32, == F.conv2d(sign(x), sign(w)) exactly
  mbn_conv2d(x, w_bases, alpha, v, beta, stride, padding)            -> float32 (Eq. 2)
  mbn_conv2d_packed(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding,
                    bias=None, clamp=None, residual=None) -> float32

Sign rule: a binarized value t (x in sign mode, w, w_bases) gives +1 where t >= 0 and -1 where t < 0,
compared in t's own dtype (float32, float64, float16 or bfloat16), so -0.0 and +0.0 give +1 and any
negative value, however small (float64 -1e-50, -1e-320), gives -1; +inf gives +1, -inf gives -1. The
activation bases H_v (v given) compare fl32(fl32(x) + v) >= 0.5 (x rounded to float32 first).

Non-finite values (the same on every backend and ISA path; all errors are ValueError naming the
argument, raised before or instead of a result):
  * NaN in a binarized input (x, w, w_bases) raises ("x: contains NaN ..."); +-inf binarizes by sign.
  * alpha, v, beta, bias and residual must be finite once converted to float32 (NaN, +-inf and
    float64 values beyond float32's range raise "<name>: contains NaN or Inf ..."). The cpp backend
    detects a non-finite residual inside the kernel's epilogue (one compare per vector), other backends
    with one isfinite pass.
  * clamp = (lo, hi) needs lo < hi (so NaN raises); an infinite bound means no bound on that side.
  * With finite inputs the float arithmetic can still overflow (e.g. alpha * beta > 3.4e38): every
    backend then produces the same IEEE results (inf, or NaN for inf * 0), and the clamp propagates NaN.
"""
from __future__ import annotations

from torch import Tensor

from .. import _checks
from . import autograd  # noqa: F401  (registers the backward formulas)
from . import validate
from .eager import call
from .library import binary_conv2d_op, mbn_conv2d_op, mbn_conv2d_packed_op, pack_signs_op
from .ste import STE_MODES, get_ste_mode, set_ste_mode, ste_mode  # noqa: F401

__all__ = ["pack_signs", "binary_conv2d", "mbn_conv2d", "mbn_conv2d_packed", "set_ste_mode", "ste_mode",
           "get_ste_mode", "STE_MODES"]


def pack_signs(x: Tensor) -> Tensor:
    """Pack sign bits along dim 1: [B, C, H, W] -> int64 [B, H, W, ceil(C/64)]; [Co, C] -> [Co, ceil(C/64)].

    Bit c % 64 of word c // 64 is 1 where x >= 0 (sign(0) = +1).
    """
    _checks.check_tensor("x", x, floating=True)
    if x.dim() not in (2, 4):
        raise ValueError(f"x: expected a 2-d [rows, C] or 4-d [B, C, H, W] tensor, got {_checks.describe(x)}")
    validate.check_no_nan("x", x)
    if x.dim() == 2:
        return call(pack_signs_op, x[:, :, None, None], differentiable=False).flatten(1)
    return call(pack_signs_op, x, differentiable=False)


def binary_conv2d(x: Tensor, w: Tensor, stride=1, padding=0) -> Tensor:
    """Exactly F.conv2d(sign(x), sign(w), stride=stride, padding=padding) (zero padding), as int32.

    x: float [B, C, H, W]; w: float [Co, C, KH, KW]. Not differentiable (integer output).
    """
    _checks.check_tensor("w", w, ndim=4, floating=True)
    stride = _checks.pair("stride", stride, minimum=1)
    padding = _checks.pair("padding", padding, minimum=0)
    validate.check_input(x, w.shape[1], w.shape[2:], stride, padding, f"w of shape {tuple(w.shape)}")
    validate.check_same_device(x, w=w)
    validate.check_no_nan("w", w)
    validate.check_values(x)
    return call(binary_conv2d_op, x, w, list(stride), list(padding), differentiable=False)


def mbn_conv2d(x: Tensor, w_bases: Tensor, alpha: Tensor, v: Tensor | None = None,
               beta: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """Multi-bit conv (paper 000 Eq. 2): sum_m sum_n alpha_m beta_n conv(sign(B_m), H_{v_n}(x)).

    x: float [B, C, H, W]; w_bases: float [M, Co, C, KH, KW] (sign taken: >= 0 -> +1); alpha: [M] or
    [M, Co]; v: [N] activation shifts, H_v(x) = sign(clip(x + v, 0, 1) - 0.5), or None for sign(x) (N = 1,
    XNOR-Net); beta: [N] or None (ones). Returns float32 [B, Co, OH, OW] (channels_last memory format).
    STE gradients for x, w_bases, v; exact gradients for alpha and beta.
    """
    _checks.check_tensor("w_bases", w_bases, ndim=5, floating=True)
    num_bases, out_channels = w_bases.shape[:2]
    if num_bases == 0 or out_channels == 0:
        raise ValueError(f"w_bases: expected [M >= 1, Co >= 1, C, KH, KW], got {_checks.describe(w_bases)}")
    stride = _checks.pair("stride", stride, minimum=1)
    padding = _checks.pair("padding", padding, minimum=0)
    validate.check_input(x, w_bases.shape[2], w_bases.shape[3:], stride, padding,
                         f"w_bases of shape {tuple(w_bases.shape)}")
    validate.check_no_nan("w_bases", w_bases)
    validate.check_alpha(alpha, num_bases, out_channels)
    beta = validate.check_activation_args(x, v, beta)
    validate.check_same_device(x, w_bases=w_bases, alpha=alpha, v=v, beta=beta)
    validate.check_values(x)
    return call(mbn_conv2d_op, x, w_bases, alpha, v, beta, list(stride), list(padding))


def mbn_conv2d_packed(x: Tensor, w_packed: Tensor, in_channels: int, kernel_size, alpha: Tensor,
                      v: Tensor | None = None, beta: Tensor | None = None, stride=1, padding=0,
                      bias: Tensor | None = None, clamp=None, residual: Tensor | None = None) -> Tensor:
    """mbn_conv2d with pre-packed weight bases w_packed: int64 [M, Co, KH, KW, ceil(in_channels/64)].

    bias: [Co] or None, added per output channel; residual: [B, Co, OH, OW] (the output's shape) or None,
    added after the bias (a ResNet shortcut); clamp: (lo, hi) or None, applied last (Hardtanh is
    (-1, 1), ReLU (0, inf)): out = clamp((mbn + bias) + residual, lo, hi), rounded in that order and
    fused into the kernel's epilogue where the backend supports it. Differentiable with respect to x,
    alpha, v, beta, bias and residual (inference and attacks on frozen models); the clamp passes
    gradient where lo < out < hi.
    """
    kernel_size = _checks.pair("kernel_size", kernel_size, minimum=1)
    validate.check_packed_weights(w_packed, in_channels, kernel_size)
    stride = _checks.pair("stride", stride, minimum=1)
    padding = _checks.pair("padding", padding, minimum=0)
    out_size = validate.check_input(x, in_channels, kernel_size, stride, padding, "in_channels")
    validate.check_alpha(alpha, *w_packed.shape[:2])
    beta = validate.check_activation_args(x, v, beta)
    validate.check_bias(bias, w_packed.shape[1])
    clamp = validate.check_clamp(clamp)
    validate.check_residual(residual, (x.shape[0], w_packed.shape[1], *out_size))
    validate.check_same_device(x, w_packed=w_packed, alpha=alpha, v=v, beta=beta, bias=bias,
                               residual=residual)
    validate.check_values(x, residual)
    args = (x, w_packed, in_channels, list(kernel_size), alpha, v, beta, list(stride), list(padding), bias,
            None if clamp is None else list(clamp))
    return call(mbn_conv2d_packed_op, *args, *(() if residual is None else (residual,)))
