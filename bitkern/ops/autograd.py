"""The ops' backward: the straight-through estimator of paper 000 Eq. 3 (docs/architecture.md), shared by
the float-weight op (mbn_conv2d) and the packed-weight op (mbn_conv2d_packed).

The input gradient's float arithmetic (the same on every backend, docs/cpu_kernels.md "The backward"):
  G       = convolution_backward(grad, W_eff) in channels_last (torch / oneDNN's backward-data pass), with
            W_eff = sum_m alpha[m, co] * sign(B_m) summed over m in order (every product exact);
  grad_x  = t_0 + t_1 + ... + t_{N-1} (left to right), t_n = fl32(G * beta_n) where the STE window of
            base n holds, else +0;
  windows = 0 <= fl32(x + v_n) <= 1 (H_v mode), |x| <= 1 (sign mode), both ends included;
  clamp   : the incoming gradient is kept where lo < out < hi (strict), else +0.
For frozen layers W_eff is cached per packed-weight tensor (effective_weight). A backend declaring
Capabilities.ste_backward computes grad_x and the clamp mask in fused kernels with exactly this
arithmetic; the others use the torch expressions below. Surrogate STE modes ("identity", "smooth") keep
float windows (t_n = fl32(fl32(beta_n * window_n) * G)).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import _bitmath, dispatch
from . import eager
from .library import mbn_conv2d_op, mbn_conv2d_packed_op, mbn_pair_counts_op
from .ste import get_ste_mode, ste_window

# w_packed -> (its version counter, in_channels, alpha (a copy), W_eff); entries die with w_packed.
_W_EFF_CACHE = WeakIdKeyDictionary()


def _plain(*tensors) -> bool:
    """True for ordinary (non-fake, non-functional, non-meta) tensors: the only ones worth caching for."""
    return all(type(t) is torch.Tensor and not t.is_meta for t in tensors)


def weff_from_signs(weights: Tensor, alpha2d: Tensor) -> Tensor:
    """sum_m alpha2d[m, co] * weights[m] (weights +-1 float32 [M, Co, C, KH, KW]) -> float32 [Co, C, KH, KW]."""
    return (alpha2d[:, :, None, None, None] * weights).sum(0)


def effective_weight(w_packed: Tensor, in_channels: int, alpha: Tensor) -> Tensor:
    """W_eff of packed weight bases, computed once per layer: reused while w_packed is unchanged (same
    tensor, same version counter: in-place writes such as load_state_dict bump it) and alpha holds the
    same values (fold_batchnorm replaces it). Identical to computing it afresh."""
    alpha = alpha.detach()
    cacheable = _plain(w_packed, alpha)
    if cacheable:
        hit = _W_EFF_CACHE.get(w_packed)
        if (hit is not None and hit[0] == w_packed._version and hit[1] == in_channels
                and hit[2].shape == alpha.shape and hit[2].dtype == alpha.dtype
                and hit[2].device == alpha.device and torch.equal(hit[2], alpha)):
            return hit[3]
    weights = _bitmath.unpack_weight_bases(w_packed, in_channels)
    w_eff = weff_from_signs(weights, _bitmath.alpha2d(alpha, *w_packed.shape[:2]))
    if cacheable:
        _W_EFF_CACHE[w_packed] = (w_packed._version, in_channels, alpha.clone(), w_eff)
    return w_eff


def clear_effective_weight_cache() -> None:
    _W_EFF_CACHE.clear()
    _SIGNS_CACHE.clear()


_SIGNS_CACHE = WeakIdKeyDictionary()  # w_packed -> (its version counter, in_channels, +-1 float32 bases)


def packed_signs(w_packed: Tensor, in_channels: int) -> Tensor:
    """The +-1 weight bases float32 [M, Co, C, KH, KW] of w_packed, cached like effective_weight."""
    if _plain(w_packed):
        hit = _SIGNS_CACHE.get(w_packed)
        if hit is not None and hit[0] == w_packed._version and hit[1] == in_channels:
            return hit[2]
    signs = _bitmath.unpack_weight_bases(w_packed, in_channels)
    if _plain(w_packed):
        _SIGNS_CACHE[w_packed] = (w_packed._version, in_channels, signs)
    return signs


def transposed_conv(grad: Tensor, w_eff: Tensor, x_shape, stride, padding) -> Tensor:
    """G = d(conv2d(x, w_eff)) / dx applied to grad, float32 channels_last (oneDNN's channels_last
    backward-data on CPU: 1.2-5x faster here than the NCHW path torch.nn.grad.conv2d_input takes, and no
    layout conversions around it)."""
    grad = grad.contiguous(memory_format=torch.channels_last)
    like = torch.empty(tuple(x_shape), dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
    return torch.ops.aten.convolution_backward(
        grad, like, w_eff.to(grad.dtype), None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
        [True, False, False])[0]


def _backend_ste(device):
    """The backend's fused STE kernels when it declares them, else None."""
    try:
        backend = dispatch.backend_for(device)
    except Exception:  # noqa: BLE001 - no backend for this device: the torch expressions below
        return None
    return backend if backend.capabilities.ste_backward else None


def ste_input_grad(x: Tensor, g_act: Tensor, v: Tensor | None, beta: Tensor) -> Tensor:
    """grad_x = sum_n beta_n * 1[window_n(x)] * G ("clipped" STE), float32, in the documented order."""
    xf = _bitmath.binarizable(x, False)
    betaf = beta.detach().float()
    vf = None if v is None else v.detach().float()
    if xf.stride() != g_act.stride() and g_act.dim() == 4:  # one element order for every path
        g_act = g_act if (g_act.is_contiguous() or g_act.is_contiguous(memory_format=torch.channels_last)) \
            else g_act.contiguous()
        xf = torch.empty_like(g_act).copy_(xf)
    if _plain(xf, g_act) and xf.device.type == "cpu":
        backend = _backend_ste(xf.device)
        if backend is not None:
            return backend.run_ste_input_grad(xf, g_act, vf, betaf)
    return ste_input_grad_torch(xf, g_act, vf, betaf)


def ste_windows(xf: Tensor, vf: Tensor | None, shifted: list[Tensor] | None = None) -> list[Tensor]:
    """The "clipped" STE windows as bool tensors: [|x| <= 1] or [0 <= fl32(x + v_n) <= 1 for n]
    (shifted: the fl32(x + v_n), when already computed)."""
    if vf is None:
        return [xf.abs() <= 1]
    shifted = shifted if shifted is not None else [xf + vn for vn in vf]
    return [(s >= 0) & (s <= 1) for s in shifted]


def ste_input_grad_torch(xf: Tensor, g_act: Tensor, vf: Tensor | None, betaf: Tensor) -> Tensor:
    """The torch expression of the fused kernel (same float arithmetic, bit for bit)."""
    grad_x = None
    for n, window in enumerate(ste_windows(xf, vf)):
        term = torch.where(window, g_act * betaf[n], 0.0)
        grad_x = term if grad_x is None else grad_x + term
    return grad_x


def clamp_mask_grad(grad: Tensor, out: Tensor, lo: float, hi: float) -> Tensor:
    """grad where lo < out < hi (strict, as torch's hardtanh / relu backward), else +0."""
    if _plain(grad, out) and grad.device.type == "cpu" and grad.dtype == torch.float32 \
            and out.dtype == torch.float32 and grad.shape == out.shape:
        backend = _backend_ste(grad.device)
        if backend is not None:
            return backend.run_clamp_grad(grad, out, lo, hi)
    return clamp_mask_grad_torch(grad, out, lo, hi)


def clamp_mask_grad_torch(grad: Tensor, out: Tensor, lo: float, hi: float) -> Tensor:
    """The torch expression of the fused clamp-mask kernel (bit for bit the same)."""
    return torch.where((out > lo) & (out < hi), grad, 0.0)


def ste_backward(grad, x, w_eff, w_shape, w_packed, in_channels, kernel_size, alpha, v, beta, stride,
                 padding, needs_x, needs_w, needs_alpha, needs_v, needs_beta, w_bases=None, signs=None):
    """STE gradients of one MBN conv. w_eff: float32 [Co, C, KH, KW] (needed for x / v), w_shape:
    [M, Co, C, KH, KW]. signs (the +-1 weight bases, float32 [M, Co, C, KH, KW]) given: the alpha / beta
    gradients come from the per-activation-base weight gradients G_n = conv2d_weight(H_n(x), grad),
    d/d alpha[m, co] = sum_n beta_n <sign(B_m)[co], G_n[co]> (training layers: no pair counts); else
    from the exact pair counts (packed op)."""
    grad = grad.float()
    num_bases, out_channels = w_shape[:2]
    alpha2d = _bitmath.alpha2d(alpha, num_bases, out_channels)
    mode = get_ste_mode()
    grad_x = grad_w = grad_alpha = grad_v = grad_beta = None

    # fl32(x + v_n), shared by the windows and the activation bases H_n(x) = +-1 [x + v_n >= 0.5]
    shifted = None
    if v is not None and ((needs_v and mode == "clipped") or needs_w or (signs is not None and
                                                                       (needs_alpha or needs_beta))):
        xf = x.float()
        shifted = [xf + vn for vn in v.float()]

    if needs_x or needs_v:
        g_act = transposed_conv(grad, w_eff, x.shape, stride, padding)
        if mode == "clipped" and (not needs_v or v.numel() == 1):
            # N = 1: grad_x is the single term t_0, so grad_v[0] = sum(t_0) (the same torch reduction of
            # the same tensor on every backend)
            total = ste_input_grad(x, g_act, v, beta)
            if needs_x:
                grad_x = total.to(x.dtype)
            if needs_v:
                grad_v = total.sum().reshape(1).to(v.dtype)
        else:
            xf = x.float()
            if mode == "clipped":
                windows = ste_windows(xf, None if v is None else v.float(), shifted)
                per_base = [torch.where(w, g_act * beta[n].float(), 0.0) for n, w in enumerate(windows)]
            else:  # surrogate windows in float
                if v is None:  # sign(x): htanh STE window |x| <= 1
                    windows = [ste_window(xf, mode)]
                else:  # H_v(x): gradient of clip(x + v, 0, 1) is 1 inside [0, 1]
                    windows = [ste_window(xf + vn, mode, 0.0, 1.0) for vn in v.float()]
                per_base = [beta[n] * windows[n] * g_act for n in range(len(windows))]
            if needs_x:
                total = per_base[0]
                for p in per_base[1:]:
                    total = total + p
                grad_x = total.to(x.dtype)
            if needs_v:
                grad_v = torch.stack([p.sum() for p in per_base]).to(v.dtype)

    per_channel = None
    if needs_w or (signs is not None and (needs_alpha or needs_beta)):
        if shifted is not None:  # == _bitmath.activation_bases(x.float(), v), value for value
            acts = [(t >= 0.5).float().mul_(2).sub_(1) for t in shifted]  # exactly +-1 (no slow where)
        else:
            acts = _bitmath.activation_bases(_bitmath.binarizable(x, v is None), v)
        if signs is not None and (needs_alpha or needs_beta):
            per_base = torch.stack([torch.nn.grad.conv2d_weight(a, w_shape[1:], grad, stride, padding)
                                    for a in acts])  # [N, Co, C, KH, KW]
            # float64 dot products: sums of many +-G terms cancel (the pair-count path was exact there)
            per_channel = torch.einsum("mokij,nokij->mno", signs.double(), per_base.double())
            grad_weight = (beta.float()[:, None, None, None, None] * per_base).sum(0) if needs_w else None
        elif needs_w:
            act_mix = sum(beta[n] * a for n, a in enumerate(acts))
            grad_weight = torch.nn.grad.conv2d_weight(act_mix, w_shape[1:], grad, stride, padding)
        if needs_w:
            grad_w = alpha2d[:, :, None, None, None] * grad_weight.unsqueeze(0)
            if mode != "identity":
                grad_w = grad_w * ste_window(w_bases.float(), mode)
            grad_w = grad_w.to(w_bases.dtype)

    if per_channel is not None:
        if needs_alpha:
            grad_alpha2d = torch.einsum("mno,n->mo", per_channel, beta.double())
            grad_alpha = (grad_alpha2d if alpha.dim() == 2 else grad_alpha2d.sum(1)).to(alpha.dtype)
        if needs_beta:
            grad_beta = torch.einsum("mno,mo->n", per_channel, alpha2d.double()).to(beta.dtype)
    elif needs_alpha or needs_beta:
        pairs = mbn_pair_counts_op(x, w_packed, in_channels, list(kernel_size), v, list(stride),
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


def _backward_mbn(ctx, grad: Tensor):
    x, w_bases, alpha, v, beta = ctx.saved_tensors
    needs_x, needs_w, needs_alpha, needs_v, needs_beta = ctx.needs_input_grad[:5]
    w_eff = weights = None
    if needs_x or needs_v or needs_alpha or needs_beta:
        weights = torch.where(w_bases >= 0, 1.0, -1.0).float()
    if needs_x or needs_v:
        w_eff = weff_from_signs(weights, _bitmath.alpha2d(alpha, *w_bases.shape[:2]))
    grads = ste_backward(grad, x, w_eff, w_bases.shape, None, w_bases.shape[2], w_bases.shape[3:],
                         alpha, v, beta, ctx.stride, ctx.padding, needs_x, needs_w, needs_alpha, needs_v,
                         needs_beta, w_bases=w_bases, signs=weights)
    return (*grads, None, None)


def _bits_backend(t: Tensor):
    """The backend that saves window bits of t for the backward (Capabilities.ste_backward), when t is a
    plain dense float32 CPU tensor; else None (the float path saves t itself)."""
    if not (_plain(t) and t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
            and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))):
        return None
    return _backend_ste(t.device)


def _in_layout(t: Tensor, strides) -> Tensor:
    """t with the given (dense) strides: t itself or a copy (the bits' element order)."""
    if t.stride() == tuple(strides):
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


# Outputs of packed convs with a fused clamp -> (their version counter, lo, hi): every value lies in
# [fl32(lo), fl32(hi)]. A consumer whose STE windows hold on that whole range needs no window bits
# (XNOR after a Hardtanh: |x| <= 1 everywhere).
_CLAMPED_OUTPUTS = WeakIdKeyDictionary()


def _windows_hold_everywhere(x: Tensor, v: Tensor | None) -> bool:
    """True when x is an unmodified clamped output of a packed conv and every STE window holds on its
    whole range (fl32(x + v) is monotone in x, so the range's ends decide)."""
    hit = _CLAMPED_OUTPUTS.get(x)
    if hit is None or hit[0] != x._version:
        return False
    lo, hi = hit[1], hit[2]
    if v is None:
        return bool(lo >= -1 and hi <= 1)
    vf = v.detach().float()
    return bool(((lo + vf) >= 0).all() and ((hi + vf) <= 1).all())


def _needs_packed(ctx) -> tuple:
    # The dispatcher drops trailing arguments equal to their defaults (bias, clamp, residual = None): pad.
    return tuple(ctx.needs_input_grad) + (False,) * (12 - len(ctx.needs_input_grad))


def _setup_packed(ctx, inputs, output):
    x, w_packed, in_channels, kernel_size, alpha, v, beta, stride, padding, bias, clamp, *rest = inputs
    residual = rest[0] if rest else None
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.in_channels, ctx.kernel_size, ctx.stride, ctx.padding = in_channels, kernel_size, stride, padding
    ctx.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))
    ctx.x_shape, ctx.x_strides = tuple(x.shape), x.stride()
    ctx.out_strides = output.stride()
    needs_x, _, _, _, needs_alpha, needs_v, needs_beta = _needs_packed(ctx)[:7]
    # Window bits (issue 16): when only the input gradient will be needed, the STE windows (and the
    # clamp's mask: lo < y < hi iff lo < z < hi) are saved as bits, 1/32 of x / out, which can then be
    # freed; the backward reads the bits (same arithmetic, docs/cpu_kernels.md "The backward").
    window_bits = clamp_bits = None
    ctx.windows_everywhere = False
    x_backend = _bits_backend(x)
    out_backend = None if clamp is None else _bits_backend(output)
    ctx.bits_backend = x_backend or out_backend  # the backward uses its kernels
    if x_backend is not None and needs_x and not (needs_alpha or needs_v or needs_beta) \
            and get_ste_mode() == "clipped":
        if (v is None or v.numel() == 1) and _windows_hold_everywhere(x, v):
            ctx.windows_everywhere = True  # grad_x = fl32(G * beta_0): nothing to save
        elif v is None:  # sign mode: |x| <= 1
            window_bits = x_backend.run_window_bits(x, None, -1.0, 1.0, False)
        else:
            window_bits = x_backend.run_window_bits(x, v.detach().float(), 0.0, 1.0, False)
    if clamp is not None:
        if _plain(output) and eager.plain_eager((output,), differentiable=False):
            with np.errstate(over="ignore"):  # the float32 bounds the kernels clamp to
                lo, hi = (float(np.float32(b)) for b in ctx.clamp)
            _CLAMPED_OUTPUTS[output] = (output._version, lo, hi)
        if out_backend is not None:
            clamp_bits = out_backend.run_window_bits(output, None, *ctx.clamp, True)
    keep_x = window_bits is None and not ctx.windows_everywhere
    ctx.save_for_backward(x if keep_x else None, w_packed, alpha, v, beta,
                          output if clamp is not None and clamp_bits is None else None, window_bits, clamp_bits)


def _backward_packed(ctx, grad: Tensor):
    x, w_packed, alpha, v, beta, out, window_bits, clamp_bits = ctx.saved_tensors
    num_inputs = len(ctx.needs_input_grad)
    needs_x, _, _, _, needs_alpha, needs_v, needs_beta, _, _, needs_bias, _, needs_residual = _needs_packed(ctx)
    if clamp_bits is not None:  # strict window, as torch's hardtanh / relu backward
        grad = ctx.bits_backend.run_masked_grad(clamp_bits, _in_layout(grad, ctx.out_strides), None)
    elif ctx.clamp is not None:
        grad = clamp_mask_grad(grad, out, *ctx.clamp)
    grad_bias = grad.float().sum((0, 2, 3)) if needs_bias else None
    # d out / d residual = 1 inside the clamp window: the masked gradient itself.
    grad_residual = grad.to(ctx.residual_dtype) if needs_residual else None
    grad_x = grad_alpha = grad_v = grad_beta = None
    if window_bits is not None or ctx.windows_everywhere:
        if get_ste_mode() != "clipped":
            raise RuntimeError(f"ste_mode: the forward ran in 'clipped' mode and saved its window bits; "
                               f"run forward and backward in the same mode (now {get_ste_mode()!r})")
        g_act = transposed_conv(grad, effective_weight(w_packed, ctx.in_channels, alpha), ctx.x_shape,
                                ctx.stride, ctx.padding)
        g_act = _in_layout(g_act, ctx.x_strides)
        if window_bits is not None:
            grad_x = ctx.bits_backend.run_masked_grad(window_bits, g_act, beta.detach().float(), out=g_act)
        else:  # N = 1, window everywhere: t_0 = fl32(G * beta_0), exactly G when beta_0 is 1
            beta0 = beta.detach().float()[0]
            grad_x = g_act if beta0.item() == 1.0 else g_act.mul_(beta0)
    elif needs_x or needs_alpha or needs_v or needs_beta:
        w_eff = effective_weight(w_packed, ctx.in_channels, alpha) if (needs_x or needs_v) else None
        w_shape = (*w_packed.shape[:2], ctx.in_channels, *ctx.kernel_size)
        # alpha / beta gradients as for the float-weight op (from the weight gradients), so both ops agree
        signs = packed_signs(w_packed, ctx.in_channels) if (needs_alpha or needs_beta) else None
        grad_x, _, grad_alpha, grad_v, grad_beta = ste_backward(
            grad, x, w_eff, w_shape, w_packed, ctx.in_channels, ctx.kernel_size, alpha, v, beta, ctx.stride,
            ctx.padding, needs_x, False, needs_alpha, needs_v, needs_beta, signs=signs)
    return (grad_x, None, None, None, grad_alpha, grad_v, grad_beta, None, None, grad_bias, None,
            grad_residual)[:num_inputs]


eager.register_autograd(mbn_conv2d_op, _backward_mbn, _setup_mbn)
eager.register_autograd(mbn_conv2d_packed_op, _backward_packed, _setup_packed)
