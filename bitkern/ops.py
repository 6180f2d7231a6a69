"""bitkern's operators, declared once with torch.library (namespace "bitkern").

Each op has a real implementation that asks bitkern.dispatch for a backend (C++ / CUDA / Triton / pure
torch), a fake implementation for meta/fake tensors (torch.compile, opcheck) and, where the output is
differentiable, an autograd formula: the straight-through estimator (STE) of paper 000 Eq. 3.

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

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import _checks, dispatch
from .backends.torch_backend import activation_bases, unpack_weight_bases

__all__ = ["pack_signs", "binary_conv2d", "mbn_conv2d", "mbn_conv2d_packed", "set_ste_mode", "ste_mode",
           "get_ste_mode"]

# ---------------------------------------------------------------------------------------------------
# STE window: "clipped" is the paper's estimator (gradient passes where the binarizer's input lies in its
# clip window); "identity" passes it everywhere; "smooth" is a triangle of the same area as the clip box
# (Bi-Real Net's ApproxSign derivative). The last two are surrogates for checking attacks for masking.
_STE_MODES = ("clipped", "identity", "smooth")
_ste = {"mode": "clipped"}


def set_ste_mode(mode: str) -> None:
    if mode not in _STE_MODES:
        raise ValueError(f"mode: expected one of {_STE_MODES}, got {mode!r}")
    _ste["mode"] = mode


def get_ste_mode() -> str:
    return _ste["mode"]


@contextlib.contextmanager
def ste_mode(mode: str):
    previous = _ste["mode"]
    set_ste_mode(mode)
    try:
        yield
    finally:
        _ste["mode"] = previous


# ---------------------------------------------------------------------------------------------------
# helpers shared by the ops

def _out_size(x: Tensor, kernel_size, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1


def _empty_channels_last(shape, dtype, device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


def _alpha2d(alpha: Tensor, num_bases: int, out_channels: int) -> Tensor:
    return alpha.float().reshape(num_bases, -1).expand(num_bases, out_channels).contiguous()


def _binarizable(t: Tensor, sign: bool = True) -> Tensor:
    """float32 tensor that binarizes like t: t itself (float32) or t.float() (float16 / bfloat16 widen
    exactly, and H_v is defined on fl32(x)); in sign mode a float64 t becomes +-1 (t < 0 -> -1), since
    rounding it to float32 could turn a tiny negative value into -0.0, whose bit is +1."""
    if sign and t.dtype == torch.float64:
        return torch.where(t < 0, -1.0, 1.0).to(torch.float32)
    return t.float()


def _pack_weight_bases(backend, w_bases: Tensor) -> Tensor:
    """float [M, Co, C, KH, KW] -> int64 [M, Co, KH, KW, Kw]."""
    packed = backend.pack_signs(_binarizable(w_bases.flatten(0, 1)).contiguous())
    return packed.unflatten(0, w_bases.shape[:2])


def _run_mbn(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias=None,
             clamp=None, residual=None) -> Tensor:
    """out = clamp((sum_{m,n} alpha beta conv_mn + bias) + residual, *clamp), rounded in that order;
    bias / residual / clamp fused into the backend's epilogue when it declares `fused_epilogue`, applied
    in torch afterwards otherwise."""
    backend = dispatch.backend_for(x.device)
    num_bases, out_channels = w_packed.shape[:2]
    bias = None if bias is None else bias.float().contiguous()
    residual = None if residual is None else residual.float()
    clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
    fused = getattr(backend, "fused_epilogue", False)
    epilogue = {}
    if fused:
        given = {"bias": bias, "clamp": clamp, "residual": residual}
        epilogue = {k: t for k, t in given.items() if t is not None}  # backends without residual still work
    out, _ = backend.mbn_conv2d_packed(
        _binarizable(x, v is None), w_packed, in_channels, tuple(kernel_size), _alpha2d(alpha, num_bases, out_channels),
        None if v is None else v.float().contiguous(), beta.float().contiguous(), tuple(stride),
        tuple(padding), **epilogue)
    if not fused:
        if bias is not None:
            out = out + bias.reshape(1, -1, 1, 1)
        if residual is not None:
            out = out + residual
        if clamp is not None:
            out = out.clamp(*clamp)
    return out.contiguous(memory_format=torch.channels_last)


# The private hooks _plain_eager reads (torch 2.13); without them every call goes through the dispatcher.
_EAGER_HOOKS = all(hasattr(mod, name) for mod, name in (
    (torch._C, "_len_torch_dispatch_stack"), (torch._C, "_is_torch_function_mode_enabled"),
    (torch._C._functorch, "peek_interpreter_stack"), (torch.autograd.profiler, "_is_profiler_enabled")))


def _plain_eager(args, differentiable: bool) -> bool:
    """True when calling an op through the dispatcher would only route to its Python implementation:
    eager (no torch.compile, dispatch or torch-function mode, functorch transform or profiler), plain
    tensors, and, for a differentiable op, no input that needs a gradient."""
    if (not _EAGER_HOOKS or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.profiler._is_profiler_enabled):
        return False
    grad = differentiable and torch.is_grad_enabled()
    return all(type(a) is Tensor and not (grad and a.requires_grad)
               for a in args if isinstance(a, Tensor))


def _call(op, *args, differentiable: bool = True):
    """op(*args); in plain eager mode its implementation is called directly (the dispatcher's Python
    custom-op path costs ~50 us per call, as much as a small conv)."""
    if _plain_eager(args, differentiable):
        return op._init_fn(*args)
    return op(*args)


# ---------------------------------------------------------------------------------------------------
# the ops

@torch.library.custom_op("bitkern::pack_signs", mutates_args=())
def _pack_signs(x: Tensor) -> Tensor:
    return dispatch.backend_for(x.device).pack_signs(_binarizable(x))


@_pack_signs.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[2], x.shape[3], -(-x.shape[1] // 64)), dtype=torch.int64)


@torch.library.custom_op("bitkern::binary_conv2d", mutates_args=())
def _binary_conv2d(x: Tensor, w: Tensor, stride: list[int], padding: list[int]) -> Tensor:
    backend = dispatch.backend_for(x.device)
    w_packed = backend.pack_signs(_binarizable(w).contiguous()).unsqueeze(0)
    _, pairs = backend.mbn_conv2d_packed(_binarizable(x), w_packed, w.shape[1], tuple(w.shape[2:]), None, None,
                                         None, tuple(stride), tuple(padding), want_pairs=True)
    return pairs[0, 0].contiguous(memory_format=torch.channels_last)


@_binary_conv2d.register_fake
def _(x, w, stride, padding):
    oh, ow = _out_size(x, w.shape[2:], stride, padding)
    return _empty_channels_last((x.shape[0], w.shape[0], oh, ow), torch.int32, x.device)


@torch.library.custom_op("bitkern::mbn_pair_counts", mutates_args=())
def _mbn_pair_counts(x: Tensor, w_packed: Tensor, in_channels: int, kernel_size: list[int],
                     v: Optional[Tensor], stride: list[int], padding: list[int]) -> Tensor:
    """Exact per-pair +-1 convolutions, int32 [M, N, B, Co, OH, OW] (used by the alpha/beta gradients)."""
    backend = dispatch.backend_for(x.device)
    _, pairs = backend.mbn_conv2d_packed(_binarizable(x, v is None), w_packed, in_channels,
                                         tuple(kernel_size), None,
                                         None if v is None else v.float().contiguous(), None,
                                         tuple(stride), tuple(padding), want_pairs=True)
    return pairs.contiguous()


@_mbn_pair_counts.register_fake
def _(x, w_packed, in_channels, kernel_size, v, stride, padding):
    oh, ow = _out_size(x, kernel_size, stride, padding)
    num_act = 1 if v is None else v.shape[0]
    return x.new_empty((w_packed.shape[0], num_act, x.shape[0], w_packed.shape[1], oh, ow),
                       dtype=torch.int32)


@torch.library.custom_op("bitkern::mbn_conv2d", mutates_args=())
def _mbn_conv2d(x: Tensor, w_bases: Tensor, alpha: Tensor, v: Optional[Tensor], beta: Tensor,
                stride: list[int], padding: list[int]) -> Tensor:
    w_packed = _pack_weight_bases(dispatch.backend_for(x.device), w_bases)
    return _run_mbn(x, w_packed, w_bases.shape[2], w_bases.shape[3:], alpha, v, beta, stride, padding)


@_mbn_conv2d.register_fake
def _(x, w_bases, alpha, v, beta, stride, padding):
    oh, ow = _out_size(x, w_bases.shape[3:], stride, padding)
    return _empty_channels_last((x.shape[0], w_bases.shape[1], oh, ow), torch.float32, x.device)


@torch.library.custom_op("bitkern::mbn_conv2d_packed", mutates_args=())
def _mbn_conv2d_packed(x: Tensor, w_packed: Tensor, in_channels: int, kernel_size: list[int],
                       alpha: Tensor, v: Optional[Tensor], beta: Tensor, stride: list[int],
                       padding: list[int], bias: Optional[Tensor] = None,
                       clamp: Optional[list[float]] = None, residual: Optional[Tensor] = None) -> Tensor:
    return _run_mbn(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias, clamp,
                    residual)


@_mbn_conv2d_packed.register_fake
def _(x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias=None, clamp=None,
      residual=None):
    oh, ow = _out_size(x, kernel_size, stride, padding)
    return _empty_channels_last((x.shape[0], w_packed.shape[1], oh, ow), torch.float32, x.device)


# ---------------------------------------------------------------------------------------------------
# STE backward (paper 000 Eq. 3), shared by both float-weight and packed-weight ops

def _ste_window(t: Tensor, mode: str, low: float = -1.0, high: float = 1.0) -> Tensor:
    """STE derivative of a binarizer whose clip window is [low, high]: 1 inside ("clipped"), 1 everywhere
    ("identity"), or a triangle peaking at the window's centre with the same area ("smooth")."""
    if mode == "identity":
        return torch.ones_like(t)
    if mode == "smooth":
        centred = (t - (low + high) / 2) * (2 / (high - low))
        return (2 - 2 * centred.abs()).clamp_min(0)
    return ((t >= low) & (t <= high)).to(t.dtype)


def _ste_backward(grad, x, weights, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding,
                  needs_x, needs_w, needs_alpha, needs_v, needs_beta, w_bases=None):
    grad = grad.float()
    xf = x.float()
    num_bases, out_channels = weights.shape[:2]
    alpha2d = _alpha2d(alpha, num_bases, out_channels)
    mode = _ste["mode"]
    grad_x = grad_w = grad_alpha = grad_v = grad_beta = None

    if needs_x or needs_v:
        w_eff = (alpha2d[:, :, None, None, None] * weights).sum(0)
        g_act = torch.nn.grad.conv2d_input(x.shape, w_eff, grad, stride, padding)
        if v is None:  # sign(x): htanh STE window |x| <= 1
            windows = [_ste_window(xf, mode)]
        else:  # H_v(x): gradient of clip(x + v, 0, 1) is 1 inside [0, 1]
            windows = [_ste_window(xf + vn, mode, 0.0, 1.0) for vn in v.float()]
        per_base = [beta[n] * windows[n] * g_act for n in range(len(windows))]
        if needs_x:
            grad_x = sum(per_base).to(x.dtype)
        if needs_v:
            grad_v = torch.stack([p.sum() for p in per_base]).to(v.dtype)

    if needs_w:
        acts = activation_bases(_binarizable(x, v is None), v)
        act_mix = sum(beta[n] * a for n, a in enumerate(acts))
        grad_weight = torch.nn.grad.conv2d_weight(act_mix, weights.shape[1:], grad, stride, padding)
        grad_w = alpha2d[:, :, None, None, None] * grad_weight.unsqueeze(0)
        if mode != "identity":
            grad_w = grad_w * _ste_window(w_bases.float(), mode)
        grad_w = grad_w.to(w_bases.dtype)

    if needs_alpha or needs_beta:
        pairs = _mbn_pair_counts(x, w_packed, in_channels, list(kernel_size), v, list(stride),
                                 list(padding)).float()
        per_channel = torch.einsum("mnbchw,bchw->mnc", pairs, grad)
        if needs_alpha:
            grad_alpha2d = torch.einsum("mnc,n->mc", per_channel, beta.float())
            grad_alpha = (grad_alpha2d if alpha.dim() == 2 else grad_alpha2d.sum(1)).to(alpha.dtype)
        if needs_beta:
            grad_beta = torch.einsum("mnc,mc->n", per_channel, alpha2d).to(beta.dtype)
    return grad_x, grad_w, grad_alpha, grad_v, grad_beta


def _setup_mbn(ctx, inputs, output):
    x, w_bases, alpha, v, beta, stride, padding = inputs
    ctx.save_for_backward(x, w_bases, alpha, v, beta)
    ctx.stride, ctx.padding = stride, padding


def _backward_mbn(ctx, grad):
    x, w_bases, alpha, v, beta = ctx.saved_tensors
    needs_x, needs_w, needs_alpha, needs_v, needs_beta = ctx.needs_input_grad[:5]
    weights = torch.where(w_bases >= 0, 1.0, -1.0).float()
    w_packed = None
    if needs_alpha or needs_beta:
        w_packed = _pack_signs(_binarizable(w_bases.flatten(0, 1)).contiguous()).unflatten(
            0, w_bases.shape[:2])
    grads = _ste_backward(grad, x, weights, w_packed, w_bases.shape[2], w_bases.shape[3:], alpha, v, beta,
                          ctx.stride, ctx.padding, needs_x, needs_w, needs_alpha, needs_v, needs_beta,
                          w_bases=w_bases)
    return (*grads, None, None)


_mbn_conv2d.register_autograd(_backward_mbn, setup_context=_setup_mbn)


def _setup_packed(ctx, inputs, output):
    x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias, clamp, *rest = inputs
    residual = rest[0] if rest else None
    ctx.residual_dtype = None if residual is None else residual.dtype
    # The clamp's backward needs only its output (lo < y < hi iff lo < z < hi), not z itself.
    ctx.save_for_backward(x, w_packed, alpha, v, beta, output if clamp is not None else None)
    ctx.in_channels, ctx.kernel_size, ctx.stride, ctx.padding = in_channels, kernel_size, stride, padding
    ctx.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))


def _backward_packed(ctx, grad):
    x, w_packed, alpha, v, beta, out = ctx.saved_tensors
    # The dispatcher drops trailing arguments equal to their defaults (bias, clamp, residual = None):
    # pad back.
    num_inputs = len(ctx.needs_input_grad)
    needs = tuple(ctx.needs_input_grad) + (False,) * (12 - num_inputs)
    needs_x, _, _, _, needs_alpha, needs_v, needs_beta, _, _, needs_bias, _, needs_residual = needs
    if ctx.clamp is not None:  # strict window, as torch's hardtanh / relu backward
        lo, hi = ctx.clamp
        grad = grad * ((out > lo) & (out < hi)).to(grad.dtype)
    grad_bias = grad.float().sum((0, 2, 3)) if needs_bias else None
    # d out / d residual = 1 inside the clamp window: the masked gradient itself.
    grad_residual = grad.to(ctx.residual_dtype) if needs_residual else None
    grad_x = grad_alpha = grad_v = grad_beta = None
    if needs_x or needs_alpha or needs_v or needs_beta:
        weights = unpack_weight_bases(w_packed, ctx.in_channels)
        grad_x, _, grad_alpha, grad_v, grad_beta = _ste_backward(
            grad, x, weights, w_packed, ctx.in_channels, ctx.kernel_size, alpha, v, beta, ctx.stride,
            ctx.padding, needs_x, False, needs_alpha, needs_v, needs_beta)
    return (grad_x, None, None, None, grad_alpha, grad_v, grad_beta, None, None, grad_bias, None,
            grad_residual)[:num_inputs]


_mbn_conv2d_packed.register_autograd(_backward_packed, setup_context=_setup_packed)


# ---------------------------------------------------------------------------------------------------
# public wrappers: validation with clear errors, then the op

def _check_same_device(x: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {_checks.describe(t)}")


def _check_activation_args(x, v, beta, num_act_name="v"):
    if v is not None:
        _checks.check_tensor("v", v, ndim=1, floating=True)
        if v.numel() == 0:
            raise ValueError(f"v: expected at least one activation shift, got {_checks.describe(v)}")
        _checks.check_finite("v", v)
    num_act = 1 if v is None else v.shape[0]
    if beta is None:
        beta = torch.ones(num_act, device=x.device)
    _checks.check_tensor("beta", beta, ndim=1, floating=True)
    if beta.shape[0] != num_act:
        expected = "1 (v is None: sign activations)" if v is None else f"{num_act} (one per shift in v)"
        raise ValueError(f"beta: expected shape [{expected}], got {_checks.describe(beta)}")
    _checks.check_finite("beta", beta)
    return beta


def _check_alpha(alpha, num_bases, out_channels):
    _checks.check_tensor("alpha", alpha, floating=True)
    if tuple(alpha.shape) not in ((num_bases,), (num_bases, out_channels)):
        raise ValueError(f"alpha: expected shape [{num_bases}] or [{num_bases}, {out_channels}] "
                         f"(per base, or per base and output channel), got {_checks.describe(alpha)}")
    _checks.check_finite("alpha", alpha)


def _check_no_nan(name, t):
    backend = dispatch.backend_for(t.device)
    # Backends with `checks_nan` detect NaN in the activations while packing them (one read of x) and
    # raise the same error; only float32 4-d x reaches them unchanged, so the message names the same
    # shape/dtype. Weights are small: always scanned here.
    if name == "x" and getattr(backend, "checks_nan", False) and t.dtype == torch.float32 and t.dim() == 4:
        return
    _checks.check_no_nan(name, t, getattr(backend, "has_nan", None))


def _check_input(x, in_channels, kernel_size, stride, padding, weight_name):
    _checks.check_tensor("x", x, ndim=4, floating=True)
    if x.shape[1] != in_channels:
        raise ValueError(f"x: expected {in_channels} input channels (from {weight_name}), "
                         f"got {_checks.describe(x)}")
    if x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor, got {_checks.describe(x)}")
    _checks.conv_output_size(x.shape, kernel_size, stride, padding)


def pack_signs(x: Tensor) -> Tensor:
    """Pack sign bits along dim 1: [B, C, H, W] -> int64 [B, H, W, ceil(C/64)]; [Co, C] -> [Co, ceil(C/64)].

    Bit c % 64 of word c // 64 is 1 where x >= 0 (sign(0) = +1).
    """
    _checks.check_tensor("x", x, floating=True)
    if x.dim() not in (2, 4):
        raise ValueError(f"x: expected a 2-d [rows, C] or 4-d [B, C, H, W] tensor, got {_checks.describe(x)}")
    _check_no_nan("x", x)
    if x.dim() == 2:
        return _call(_pack_signs, x[:, :, None, None], differentiable=False).flatten(1)
    return _call(_pack_signs, x, differentiable=False)


def binary_conv2d(x: Tensor, w: Tensor, stride=1, padding=0) -> Tensor:
    """Exactly F.conv2d(sign(x), sign(w), stride=stride, padding=padding) (zero padding), as int32.

    x: float [B, C, H, W]; w: float [Co, C, KH, KW]. Not differentiable (integer output).
    """
    _checks.check_tensor("w", w, ndim=4, floating=True)
    stride = _checks.pair("stride", stride, minimum=1)
    padding = _checks.pair("padding", padding, minimum=0)
    _check_input(x, w.shape[1], w.shape[2:], stride, padding, f"w of shape {tuple(w.shape)}")
    _check_same_device(x, w=w)
    _check_no_nan("w", w)
    _check_values(x)
    return _call(_binary_conv2d, x, w, list(stride), list(padding), differentiable=False)


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
    _check_input(x, w_bases.shape[2], w_bases.shape[3:], stride, padding,
                 f"w_bases of shape {tuple(w_bases.shape)}")
    _check_no_nan("w_bases", w_bases)
    _check_alpha(alpha, num_bases, out_channels)
    beta = _check_activation_args(x, v, beta)
    _check_same_device(x, w_bases=w_bases, alpha=alpha, v=v, beta=beta)
    _check_values(x)
    return _call(_mbn_conv2d, x, w_bases, alpha, v, beta, list(stride), list(padding))


def _check_bias(bias, out_channels):
    if bias is None:
        return
    _checks.check_tensor("bias", bias, ndim=1, floating=True)
    if bias.shape[0] != out_channels:
        raise ValueError(f"bias: expected shape [{out_channels}] (one per output channel, Co), "
                         f"got {_checks.describe(bias)}")
    _checks.check_finite("bias", bias)


def _check_residual(residual, expected_shape):
    if residual is None:
        return
    _checks.check_tensor("residual", residual, ndim=4, floating=True)
    if tuple(residual.shape) != tuple(expected_shape):
        raise ValueError(f"residual: expected shape {list(expected_shape)} (the output's [B, Co, OH, OW]), "
                         f"got {_checks.describe(residual)}")


def _check_values(x, residual=None):
    """The value checks of x (NaN) and residual (finite), last, in that order: backends with `checks_nan`
    / `checks_residual` make them inside the kernel after the parameters were checked here, so every
    backend names the same argument when several are bad."""
    _check_no_nan("x", x)
    if residual is None:
        return
    # Backends with `checks_residual` detect a non-finite residual in their fused epilogue (no extra
    # pass) and raise the same error; only a float32 residual reaches them unchanged.
    backend = dispatch.backend_for(residual.device)
    if not (getattr(backend, "checks_residual", False) and residual.dtype == torch.float32):
        _checks.check_finite("residual", residual)


def _check_clamp(clamp):
    """None, or (lo, hi) real numbers with lo < hi (either may be infinite: ReLU is (0, inf))."""
    if clamp is None:
        return None
    if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in clamp)):
        raise TypeError(f"clamp: expected None or a (lo, hi) pair of floats, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:  # also rejects NaN
        raise ValueError(f"clamp: expected lo < hi, got {clamp!r}")
    return [lo, hi]


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
    _checks.check_tensor("w_packed", w_packed, ndim=5, dtype=torch.int64)
    kernel_size = _checks.pair("kernel_size", kernel_size, minimum=1)
    words = -(-in_channels // 64)
    expected = (kernel_size[0], kernel_size[1], words)
    if tuple(w_packed.shape[2:]) != expected or min(w_packed.shape[:2]) == 0:
        raise ValueError(f"w_packed: expected shape [M, Co, {expected[0]}, {expected[1]}, {words}] for "
                         f"in_channels={in_channels}, kernel_size={kernel_size}, got "
                         f"{_checks.describe(w_packed)}")
    stride = _checks.pair("stride", stride, minimum=1)
    padding = _checks.pair("padding", padding, minimum=0)
    _check_input(x, in_channels, kernel_size, stride, padding, "in_channels")
    _check_alpha(alpha, *w_packed.shape[:2])
    beta = _check_activation_args(x, v, beta)
    _check_bias(bias, w_packed.shape[1])
    clamp = _check_clamp(clamp)
    out_size = _out_size(x, kernel_size, stride, padding)
    _check_residual(residual, (x.shape[0], w_packed.shape[1], *out_size))
    _check_same_device(x, w_packed=w_packed, alpha=alpha, v=v, beta=beta, bias=bias, residual=residual)
    _check_values(x, residual)
    args = (x, w_packed, in_channels, list(kernel_size), alpha, v, beta, list(stride), list(padding), bias,
            clamp)
    return _call(_mbn_conv2d_packed, *args, *(() if residual is None else (residual,)))
