"""Reference semantics of bitkern's ops in numpy, with explicit loops (no torch, no compiled code).

Conventions (docs/architecture.md): sign(t) = +1 if t >= 0 else -1; H_v(x) = sign(clip(x + v, 0, 1) - 0.5)
with x + v in float32; packing puts channel c in word c // 64, bit c % 64; zero padding means padded taps
contribute nothing to the +-1 convolution.
"""
import numpy as np


def sign(t):
    """+1 where t >= 0 (including -0.0), else -1, as int64."""
    return np.where(np.asarray(t) >= 0, 1, -1).astype(np.int64)


def hv_sign(x, v):
    """ABC-Net activation base H_v(x) = sign(clip(x + v, 0, 1) - 0.5), the sum rounded to float32."""
    shifted = np.asarray(x, dtype=np.float32) + np.float32(v)
    clipped = np.clip(shifted, np.float32(0), np.float32(1))
    return sign(clipped - np.float32(0.5))


def pack_signs_ref(x):
    """float [B, C, H, W] -> int64 [B, H, W, ceil(C/64)]: bit c%64 of word c//64 is 1 where x >= 0."""
    x = np.asarray(x)
    batch, channels, height, width = x.shape
    words = -(-channels // 64)
    packed = np.zeros((batch, height, width, words), dtype=np.uint64)
    for c in range(channels):
        bit = (x[:, c] >= 0).astype(np.uint64) << np.uint64(c % 64)
        packed[..., c // 64] |= bit
    return packed.view(np.int64)


def unpack_signs_ref(packed, channels):
    """Inverse of pack_signs_ref: int64 [B, H, W, Kw] -> int64 +-1 [B, channels, H, W]."""
    words = np.asarray(packed).view(np.uint64)
    out = np.empty((words.shape[0], channels) + words.shape[1:3], dtype=np.int64)
    for c in range(channels):
        bit = (words[..., c // 64] >> np.uint64(c % 64)) & np.uint64(1)
        out[:, c] = np.where(bit == 1, 1, -1)
    return out


def _pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def _valid_taps(out_hw, in_hw, kernel_hw, stride, padding):
    """Yield (oh, ow, kh, kw, ih, iw) for every kernel tap that lands inside the input; taps in the zero
    padding are skipped, which is what "padded taps contribute 0" means."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    for oh in range(out_hw[0]):
        for ow in range(out_hw[1]):
            for kh in range(kernel_hw[0]):
                ih = oh * sh - ph + kh
                if not 0 <= ih < in_hw[0]:
                    continue
                for kw in range(kernel_hw[1]):
                    iw = ow * sw - pw + kw
                    if 0 <= iw < in_hw[1]:
                        yield oh, ow, kh, kw, ih, iw


def _conv_pm1(act, weight, stride, padding):
    """Integer convolution of +-1 maps with zero padding, by explicit loops over output positions and taps.

    act: int [B, C, H, W]; weight: int [Co, C, KH, KW]. Returns int64 [B, Co, OH, OW].
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    batch, _, height, width = act.shape
    out_channels, _, kh_size, kw_size = weight.shape
    out_hw = ((height + 2 * ph - kh_size) // sh + 1, (width + 2 * pw - kw_size) // sw + 1)
    out = np.zeros((batch, out_channels) + out_hw, dtype=np.int64)
    for oh, ow, kh, kw, ih, iw in _valid_taps(out_hw, (height, width), (kh_size, kw_size), stride, padding):
        out[:, :, oh, ow] += act[:, :, ih, iw] @ weight[:, :, kh, kw].T  # [B, C] x [Co, C] -> [B, Co]
    return out


def _conv_transpose_pm1(grad_out, weight, input_shape, stride, padding):
    """Adjoint of _conv_pm1 with respect to its input (float), by loops."""
    grad_in = np.zeros(input_shape, dtype=np.float64)
    for oh, ow, kh, kw, ih, iw in _valid_taps(grad_out.shape[2:], input_shape[2:], weight.shape[2:], stride,
                                              padding):
        grad_in[:, :, ih, iw] += grad_out[:, :, oh, ow] @ weight[:, :, kh, kw]
    return grad_in


def _conv_weight_grad(act, grad_out, weight_shape, stride, padding):
    """Gradient of sum(grad_out * conv(act, W)) with respect to W, by loops."""
    grad_w = np.zeros(weight_shape, dtype=np.float64)
    for oh, ow, kh, kw, ih, iw in _valid_taps(grad_out.shape[2:], act.shape[2:], weight_shape[2:], stride,
                                              padding):
        grad_w[:, :, kh, kw] += grad_out[:, :, oh, ow].T @ act[:, :, ih, iw]
    return grad_w


def binary_conv2d_ref(x, w, stride=1, padding=0):
    """Exact F.conv2d(sign(x), sign(w), stride, padding) with zero padding, as int64."""
    return _conv_pm1(sign(x), sign(w), stride, padding)


def _activation_bases(x, v):
    """List of +-1 activation bases: [sign(x)] when v is None, else [H_{v_n}(x) for each n]."""
    if v is None:
        return [sign(x)]
    return [hv_sign(x, vn) for vn in np.asarray(v, dtype=np.float32).reshape(-1)]


def _alpha2d(alpha, num_bases, out_channels):
    alpha = np.asarray(alpha, dtype=np.float64)
    return np.broadcast_to(alpha.reshape(num_bases, -1), (num_bases, out_channels))


def mbn_pairs_ref(x, w_bases, v, stride=1, padding=0):
    """Per-pair +-1 convolutions conv(sign(B_m), act_n) as int64 [M, N, B, Co, OH, OW]."""
    acts = _activation_bases(x, v)
    return np.stack([np.stack([_conv_pm1(a, sign(wm), stride, padding) for a in acts])
                     for wm in np.asarray(w_bases)])


def mbn_conv2d_ref(x, w_bases, alpha, v, beta, stride=1, padding=0):
    """sum_m sum_n alpha_m * beta_n * conv(sign(B_m), act_n), in float64 (paper 000 Eq. 2)."""
    pairs = mbn_pairs_ref(x, w_bases, v, stride, padding)
    num_w, num_a = pairs.shape[:2]
    alpha2d = _alpha2d(alpha, num_w, pairs.shape[3])
    beta = np.ones(num_a) if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
    out = np.zeros(pairs.shape[2:], dtype=np.float64)
    for m in range(num_w):
        for n in range(num_a):
            out += alpha2d[m][None, :, None, None] * beta[n] * pairs[m, n]
    return out


def mbn_conv2d_grads_ref(x, w_bases, alpha, v, beta, grad_out, stride=1, padding=0):
    """STE gradients of sum(grad_out * mbn_conv2d(...)) (paper 000 Eq. 3), as a dict of float64 arrays.

    Activation STE: d H_v(x) / dx = 1[0 <= x + v <= 1]; sign mode (v None): d sign(x) / dx = 1[|x| <= 1].
    Weight STE: d sign(w) / dw = 1[|w| <= 1]. alpha and beta gradients are exact.
    """
    x = np.asarray(x, dtype=np.float32)
    w_bases = np.asarray(w_bases, dtype=np.float32)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    num_w, out_channels = w_bases.shape[:2]
    alpha_in = np.asarray(alpha, dtype=np.float64)
    alpha2d = _alpha2d(alpha_in, num_w, out_channels)
    acts = _activation_bases(x, v)
    beta_arr = np.ones(len(acts)) if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
    signs_w = [sign(wm) for wm in w_bases]
    w_eff = sum(alpha2d[m][:, None, None, None] * signs_w[m] for m in range(num_w))
    g_act = _conv_transpose_pm1(grad_out, w_eff, x.shape, stride, padding)

    if v is None:
        windows = [(np.abs(x) <= 1).astype(np.float64)]
    else:
        shifted = [x + np.float32(vn) for vn in np.asarray(v, dtype=np.float32).reshape(-1)]
        windows = [((s >= 0) & (s <= 1)).astype(np.float64) for s in shifted]
    grad_x = sum(beta_arr[n] * windows[n] * g_act for n in range(len(acts)))
    grads = {"x": grad_x}
    if v is not None:
        grads["v"] = np.array([np.sum(beta_arr[n] * windows[n] * g_act) for n in range(len(acts))])

    act_mix = sum(beta_arr[n] * acts[n] for n in range(len(acts)))
    grad_wm = _conv_weight_grad(act_mix, grad_out, w_bases.shape[1:], stride, padding)
    grads["w_bases"] = np.stack([alpha2d[m][:, None, None, None] * grad_wm * (np.abs(w_bases[m]) <= 1)
                                 for m in range(num_w)])

    pairs = mbn_pairs_ref(x, w_bases, v, stride, padding).astype(np.float64)
    # d out / d alpha[m, co] = sum_n beta_n * pairs[m, n, :, co]; d out / d beta_n = sum_m alpha[m, co] pairs
    per_channel = np.einsum("mnbchw,bchw->mnc", pairs, grad_out)
    grad_alpha2d = np.einsum("mnc,n->mc", per_channel, beta_arr)
    grads["alpha"] = grad_alpha2d.reshape(alpha_in.shape) if alpha_in.ndim == 2 else grad_alpha2d.sum(1)
    if beta is not None:
        grads["beta"] = np.einsum("mnc,mc->n", per_channel, alpha2d)
    return grads


def mbn_epilogue_ref(pairs, alpha2d, beta, bias=None, residual=None, clamp=None):
    """The backends' float contract, step for step in float32: out = sum over n (outer), m (inner) of
    fl32(alpha[m, co] * beta[n]) * pairs[m, n], every product and sum rounded to float32; then + bias,
    + residual, clamp(lo, hi). pairs int [M, N, B, Co, OH, OW]; returns float32 [B, Co, OH, OW]."""
    pairs = np.asarray(pairs)
    num_w, num_a = pairs.shape[:2]
    alpha2d = np.asarray(alpha2d, dtype=np.float32)
    beta = np.asarray(beta, dtype=np.float32).reshape(-1)
    out = None
    for n in range(num_a):
        for m in range(num_w):
            scale = (alpha2d[m] * beta[n]).astype(np.float32)
            term = pairs[m, n].astype(np.float32) * scale[None, :, None, None]
            out = term if out is None else (out + term).astype(np.float32)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float32)[None, :, None, None]
    if residual is not None:
        out = out + np.asarray(residual, dtype=np.float32)
    if clamp is not None:
        out = np.clip(out, np.float32(clamp[0]), np.float32(clamp[1]))
    return out.astype(np.float32)


def ste_input_grad_f32_ref(x, g, v, beta):
    """The STE input gradient's float32 arithmetic (bitkern/ops/autograd.py, issue 16), elementwise:
    t_n = fl32(g * beta_n) where 0 <= fl32(x + v_n) <= 1 (|x| <= 1 when v is None), else +0;
    result t_0 + t_1 + ... + t_{N-1}, added left to right in float32."""
    x = np.asarray(x, dtype=np.float32)
    g = np.asarray(g, dtype=np.float32)
    beta = np.asarray(beta, dtype=np.float32).reshape(-1)
    if v is None:
        windows = [np.abs(x) <= np.float32(1)]
    else:
        shifted = [x + np.float32(vn) for vn in np.asarray(v, dtype=np.float32).reshape(-1)]
        windows = [(s >= np.float32(0)) & (s <= np.float32(1)) for s in shifted]
    total = None
    for n, window in enumerate(windows):
        term = np.where(window, g * beta[n], np.float32(0)).astype(np.float32)
        total = term if total is None else (total + term).astype(np.float32)
    return total


def window_bits_ref(src, shift, lo, hi, open_):
    """Window bits of the flat float32 src (issue 16): uint64 [K, ceil(n / 64)], bit i % 64 of word i / 64
    of mask k set where lo < s < hi (open_) or lo <= s <= hi, s = fl32(src[i] + shift[k]) (shift None:
    s = src[i], K = 1); bits past n are 0."""
    src = np.asarray(src, dtype=np.float32).reshape(-1)
    shifted = [src] if shift is None else [src + np.float32(s) for s in np.asarray(shift, np.float32).reshape(-1)]
    lo, hi = np.float32(lo), np.float32(hi)
    words = -(-src.size // 64)
    out = np.zeros((len(shifted), words), dtype=np.uint64)
    for k, s in enumerate(shifted):
        inside = (s > lo) & (s < hi) if open_ else (s >= lo) & (s <= hi)
        padded = np.zeros(words * 64, dtype=np.uint64)
        padded[:src.size] = inside
        out[k] = (padded.reshape(words, 64) << np.arange(64, dtype=np.uint64)).sum(1, dtype=np.uint64)
    return out


def masked_grad_ref(bits, g, scale):
    """The backward read from window bits: t_k = fl32(g * scale[k]) (scale None: g) where bit i of mask k
    is set, else +0; t_0 + t_1 + ... added left to right in float32 (g flat, float32)."""
    g = np.asarray(g, dtype=np.float32).reshape(-1)
    bits = np.asarray(bits, dtype=np.uint64)
    total = None
    for k in range(bits.shape[0]):
        inside = ((bits[k].repeat(64) >> np.tile(np.arange(64, dtype=np.uint64), bits.shape[1])) & np.uint64(1))
        term = np.where(inside[:g.size] == 1, g if scale is None else g * np.float32(scale[k]), np.float32(0))
        term = term.astype(np.float32)
        total = term if total is None else (total + term).astype(np.float32)
    return total


def clamp_grad_f32_ref(g, out, lo, hi):
    """The fused clamp's backward: g where lo < out < hi (strict), else +0 (float32)."""
    g = np.asarray(g, dtype=np.float32)
    out = np.asarray(out, dtype=np.float32)
    return np.where((out > lo) & (out < hi), g, np.float32(0)).astype(np.float32)
